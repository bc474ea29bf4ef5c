"""Batched answering of a COMI dataset and SQuAD-style scoring (docs/method.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .data import COMIDataCollator, truncate_context
from .errors_comi import InvalidInputError
from .metrics import best_exact_match, best_f1
from .processing_comi import decode_answers

__all__ = ["answer_dataset", "summarize", "write_metrics"]


def answer_dataset(
    model,
    tokenizer,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    merge_size: int | None = None,
    max_context_tokens: int | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> list[dict]:
    """Answer every example of a dataset from `load_comi_jsonl`, in order.

    Returns one record per example: `id`, `context`, `question`, `prediction`, `references`,
    `exact_match`, `f1`, `context_tokens`, `memory_tokens`.
    """
    collate = COMIDataCollator()
    device = next(model.parameters()).device
    records = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="Evaluating", unit="batch", disable=not progress):
        examples = dataset[start : start + batch_size]
        features = []
        for context, question in zip(examples["context"], examples["question"], strict=True):
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            features.append(
                {
                    "input_ids": truncate_context(context_ids, max_context_tokens),
                    "query_ids": tokenizer(question, add_special_tokens=False)["input_ids"],
                }
            )
        batch = {key: value.to(device) for key, value in collate(features).items()}
        with torch.inference_mode():
            memory, memory_mask = model.compress(**batch, merge_size=merge_size)
            generated = model.generate(
                query_ids=batch["query_ids"],
                query_attention_mask=batch["query_attention_mask"],
                memory=(memory, memory_mask),
                **generate_kwargs,
            )
        predictions = decode_answers(tokenizer, generated)
        rows = zip(
            examples["id"], examples["context"], examples["question"], examples["answers"], predictions, strict=True
        )
        for position, (identifier, context, question, references, prediction) in enumerate(rows):
            records.append(
                {
                    "id": identifier,
                    "context": context,
                    "question": question,
                    "prediction": prediction,
                    "references": references,
                    "exact_match": best_exact_match(prediction, references),
                    "f1": best_f1(prediction, references),
                    "context_tokens": int(batch["attention_mask"][position].sum()),
                    "memory_tokens": int(memory_mask[position].sum()),
                }
            )
    return records


def summarize(records: Iterable[dict], merge_size: int) -> dict:
    """Mean exact match and F1, the sample count, the merge size and the mean compression ratio."""
    records = list(records)
    if not records:
        raise InvalidInputError("No evaluated examples to summarize.")
    count = len(records)
    return {
        "exact_match": sum(record["exact_match"] for record in records) / count,
        "f1": sum(record["f1"] for record in records) / count,
        "num_samples": count,
        "merge_size": merge_size,
        "compression_ratio": round(
            sum(record["context_tokens"] / record["memory_tokens"] for record in records) / count, 4
        ),
    }


def write_metrics(path: str | Path, metrics: dict) -> None:
    """`metrics` as indented JSON, one final newline."""
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
