"""`pipeline("comi-qa")`: answer questions about long documents with a COMI model.

This file is also shipped as remote code beside saved models, so it imports nothing from the
`comi_hf` package. Importing it registers the task.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .mig import check_merge_size
from .packing import pad_token_lists

__all__ = [
    "PIPELINE_TASK",
    "COMIQuestionAnsweringPipeline",
    "answer_records",
    "custom_pipelines_entry",
    "decode_answers",
    "encode_texts",
]

PIPELINE_TASK = "comi-qa"


class COMIQuestionAnsweringPipeline(Pipeline):
    """Answer questions about a context with a COMI model (compressed context + decoder).

    Calls:

    * `pipe(context=..., question=...)` -> `{"answer", "context_tokens", "memory_tokens", "compression_ratio"}`
    * `pipe(context=..., questions=[...])` -> `{"answers": [...], ...}`: the context is encoded
      once and only the queries, the compression and the decoding run per question.
    * `pipe([{"context": ..., "question": ...}, ...], batch_size=8)` -> a list of results, in order.

    Options: `merge_size` (the compression ratio for this call), `return_compression=True`
    (per memory vector, the span of context tokens it fused and their weights), and any
    generation argument (`max_new_tokens`, `do_sample`, `num_beams`, ...).

    With `num_return_sequences=k > 1`, every answer comes as k, best first, in the shape of
    transformers' text-generation pipeline: a question gives a list of k result dicts, and
    `questions=[...]` gives `"answers"` as one list of k strings per question.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, inputs: Any = None, *, context=None, question=None, questions=None, **kwargs):
        inputs = gather_inputs(inputs, context, question, questions)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError("Got an empty list of inputs; give at least one {'context': ..., 'question': ...}.")
        if isinstance(inputs, (list, tuple)) and (kwargs.get("batch_size") or self._batch_size or 1) > 1:
            if any(isinstance(item, dict) and "questions" in item for item in inputs):
                raise ValueError(
                    "Items with several `questions` already run as one batch; call them one at a time "
                    "(or give one `question` per item to batch them)."
                )
        return super().__call__(inputs, **kwargs)

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        """transformers' iterator, with a collator that pads with id 0 under the masks.

        The default collator pads with the tokenizer's pad token and refuses tokenizers that
        have none (Llama, Mistral); COMI masks padding everywhere, so no pad token is needed.
        """
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_pad_right)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _sanitize_parameters(
        self,
        merge_size: int | None = None,
        return_compression: bool | None = None,
        generate_kwargs: dict | None = None,
        **kwargs,
    ):
        forward_params: dict[str, Any] = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        postprocess_params: dict[str, Any] = {}
        if merge_size is not None:
            forward_params["merge_size"] = check_merge_size(merge_size)
        if return_compression is not None:
            forward_params["return_compression"] = bool(return_compression)
            postprocess_params["return_compression"] = bool(return_compression)
        return {}, forward_params, postprocess_params

    def preprocess(self, inputs: dict) -> dict:
        if not isinstance(inputs, dict):
            raise TypeError(f"Each input must be a dict with `context` and `question`, got {type(inputs).__name__}.")
        context = inputs.get("context")
        if not isinstance(context, str):
            raise TypeError(f"`context` must be a string, got {type(context).__name__}.")
        if not context.strip():
            raise ValueError("The context is empty.")
        has_one, has_many = "question" in inputs, "questions" in inputs
        if has_one == has_many:
            raise ValueError("Give exactly one of `question` (a string) and `questions` (a list of strings).")
        questions = [inputs["question"]] if has_one else inputs["questions"]
        if not isinstance(questions, (list, tuple)) or not questions:
            raise TypeError("`questions` must be a non-empty list of strings.")
        for position, text in enumerate(questions):
            if not isinstance(text, str):
                raise TypeError(f"Question {position} must be a string, got {type(text).__name__}.")
            if not text.strip():
                raise ValueError(f"Question {position} is empty.")
        input_ids, attention_mask = encode_texts(self.tokenizer, [context])
        if input_ids.shape[1] == 0:
            raise ValueError("The context has no tokens.")
        query_ids, query_attention_mask = encode_texts(self.tokenizer, questions)
        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_ids": query_ids,
            "query_attention_mask": query_attention_mask,
        }
        if has_many:
            model_inputs["several_questions"] = True
        return model_inputs

    def _forward(
        self,
        model_inputs: dict,
        merge_size: int | None = None,
        return_compression: bool = False,
        generate_kwargs: dict | None = None,
    ) -> dict:
        several = model_inputs.pop("several_questions", False)
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        query_ids, query_mask = model_inputs["query_ids"], model_inputs["query_attention_mask"]
        if several:
            # One context, many questions: its encoder pass is shared by all of them.
            contexts = {"context_encoding": self.model.encode_context(input_ids, attention_mask)}
        else:
            contexts = {"input_ids": input_ids, "attention_mask": attention_mask}
        memory, memory_mask, *details = self.model.compress(
            query_ids=query_ids,
            query_attention_mask=query_mask,
            merge_size=merge_size,
            return_details=return_compression,
            **contexts,
        )
        generated = self.model.generate(
            query_ids=query_ids,
            query_attention_mask=query_mask,
            memory=(memory, memory_mask),
            **(generate_kwargs or {}),
        )
        if not isinstance(generated, torch.Tensor):
            generated = generated.sequences
        # `num_return_sequences` answers per query, query-major: (queries, k, new tokens), so that
        # unbatching hands each input its own k answers.
        num_queries = query_ids.shape[0]
        outputs = {
            "generated": generated.view(num_queries, generated.shape[0] // num_queries, generated.shape[1]),
            "memory_tokens": memory_mask.sum(1),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if several:
            outputs["several_questions"] = True
        if return_compression:
            outputs["token_memory"] = details[0].token_memory
            outputs["token_weight"] = details[0].token_weight
        return outputs

    def postprocess(self, model_outputs: dict, return_compression: bool = False) -> dict | list[dict]:
        generated = model_outputs["generated"]  # (queries, k, new tokens)
        num_queries, per_query = generated.shape[:2]
        texts = decode_answers(self.tokenizer, generated.flatten(0, 1))
        answers = [texts[row * per_query : (row + 1) * per_query] for row in range(num_queries)]
        context_ids = model_outputs["input_ids"][0][model_outputs["attention_mask"][0].bool()].tolist()
        context_tokens = len(context_ids)
        memory_tokens = [int(count) for count in model_outputs["memory_tokens"]]
        compressions = None
        if return_compression:
            token_texts = _token_texts(self.tokenizer, context_ids)
            compressions = [
                _compression_record(
                    token_texts,
                    model_outputs["token_memory"][row][:context_tokens].tolist(),
                    model_outputs["token_weight"][row][:context_tokens].tolist(),
                    count,
                )
                for row, count in enumerate(memory_tokens)
            ]
        several = model_outputs.get("several_questions", False)
        return answer_records(answers, context_tokens, memory_tokens, several, compressions)


def gather_inputs(inputs, context=None, question=None, questions=None):
    """The inputs of a `comi-qa` call: given positionally (a dict or a list of dicts), or as
    `context=` with `question=` or `questions=` (then one dict)."""
    if inputs is None:
        if context is None:
            raise ValueError("Give a `context` and a `question` (or `questions`), or a list of such dicts.")
        inputs = {"context": context}
        if question is not None:
            inputs["question"] = question
        if questions is not None:
            inputs["questions"] = questions
    elif context is not None or question is not None or questions is not None:
        raise ValueError("Give the inputs either positionally or as `context=`/`question=`, not both.")
    return inputs


def decode_answers(tokenizer, sequences) -> list[str]:
    """Answer texts of generated token ids (special tokens dropped, surrounding spaces stripped)."""
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def answer_records(
    answers: list[list[str]],
    context_tokens: int,
    memory_tokens: list[int],
    several: bool,
    compressions: list[dict] | None = None,
) -> dict | list[dict]:
    """The `comi-qa` result for the questions about one context (the serving client's too).

    `answers` holds each question's sequences (one, or `num_return_sequences`). One question:
    `{"answer", "context_tokens", "memory_tokens", "compression_ratio"}`, or a list of such dicts
    for several sequences; `several` questions: one dict whose `answers`, `memory_tokens` and
    `compression_ratio` are lists in question order.
    """
    ratios = [context_tokens / count for count in memory_tokens]
    if several:
        result = {
            "answers": [sequences[0] if len(sequences) == 1 else sequences for sequences in answers],
            "context_tokens": context_tokens,
            "memory_tokens": memory_tokens,
            "compression_ratio": ratios,
        }
        if compressions is not None:
            result["compressions"] = compressions
        return result
    results = []
    for answer in answers[0]:
        result = {
            "answer": answer,
            "context_tokens": context_tokens,
            "memory_tokens": memory_tokens[0],
            "compression_ratio": ratios[0],
        }
        if compressions is not None:
            result["compression"] = compressions[0]
        results.append(result)
    return results[0] if len(results) == 1 else results


def _pad_right(items: list[dict]) -> dict:
    """Batch preprocessed inputs: each `(1, len)` tensor right-padded with 0 to the longest."""
    batch = {}
    for key in items[0]:
        width = max(item[key].shape[1] for item in items)
        batch[key] = torch.cat([torch.nn.functional.pad(item[key], (0, width - item[key].shape[1])) for item in items])
    return batch


def encode_texts(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `(len(texts), longest)` and attention mask, without special tokens (as the
    official code does), right-padded with id 0: COMI masks padding everywhere, so this works for
    tokenizers that have no pad token (Llama, Mistral)."""
    return pad_token_lists(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def _token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded context, with its leading space if any.

    Decoding tokens one by one loses the spaces tokenizers put between words; the text a token
    adds after its predecessor keeps them.
    """
    texts = []
    for position, token in enumerate(token_ids):
        alone = tokenizer.decode([token])
        if position:
            previous = tokenizer.decode([token_ids[position - 1]])
            pair = tokenizer.decode([token_ids[position - 1], token])
            if pair.startswith(previous):
                alone = pair[len(previous) :]
        texts.append(alone)
    return texts


def _compression_record(tokens: list[str], token_memory: list[int], token_weight: list[float], count: int) -> dict:
    """Per memory vector: the span `[start, end)` of context tokens it fused and their weights.

    Each memory vector fuses a run of consecutive tokens, in order, so one pass finds the runs.
    """
    starts = [
        position
        for position in range(len(token_memory))
        if position == 0 or token_memory[position] != token_memory[position - 1]
    ]
    ends = starts[1:] + [len(token_memory)]
    groups = [
        {"start": start, "end": end, "weights": token_weight[start:end]}
        for start, end in zip(starts, ends, strict=True)
    ]
    if len(groups) != count or [token_memory[start] for start in starts] != list(range(count)):
        raise RuntimeError("The compression details do not describe consecutive runs of tokens.")
    return {"tokens": tokens, "groups": groups}


def custom_pipelines_entry(pipeline_class: type = COMIQuestionAnsweringPipeline) -> dict:
    """The `custom_pipelines` entry of a saved model's config, as `Pipeline.save_pretrained` writes it."""
    module = pipeline_class.__module__.rsplit(".", 1)[-1]
    return {
        PIPELINE_TASK: {
            "impl": f"{module}.{pipeline_class.__name__}",
            "pt": ["AutoModelForCausalLM"],
            "tf": [],
            "type": "text",
        }
    }


# The tiny trained model shipped inside the package (absent where this file runs as remote code).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

if PIPELINE_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK,
        pipeline_class=COMIQuestionAnsweringPipeline,
        pt_model=AutoModelForCausalLM,
        # `pipeline("comi-qa")` without a model then loads the shipped one (a local path: no download).
        default={"model": (DEFAULT_MODEL, None)} if os.path.isdir(DEFAULT_MODEL) else None,
        type="text",
    )
