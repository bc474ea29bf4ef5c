"""COMI data: the official JSONL format (docs/method.md), tokenisation (docs/method.md) and a padding collator.

Each line is `{"input": context, "prompt": question, "answer": str or non-empty list of str}`.
Malformed lines are errors naming the file, the line and the field; nothing is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset

from .errors_comi import InvalidInputError, MalformedDataError, UsageError
from .processing_comi import pad_token_lists

__all__ = ["COMIDataCollator", "load_comi_jsonl", "tokenize_example", "truncate_context", "word_level_tokenizer"]


def _rows(path: Path):
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}, line {line_number}"
            try:
                # A byte-order mark may open the file (some editors write one).
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise MalformedDataError(f"{where}: not UTF-8 text (byte {error.start} cannot be decoded)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedDataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise MalformedDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for field in ("input", "prompt", "answer"):
                if field not in record:
                    raise MalformedDataError(f"{where}: missing field `{field}`")
            for field in ("input", "prompt"):
                if not isinstance(record[field], str):
                    raise MalformedDataError(
                        f"{where}: field `{field}` must be a string, got {type(record[field]).__name__}"
                    )
                if not record[field].strip():
                    raise MalformedDataError(f"{where}: field `{field}` is empty")
            answers = record["answer"]
            if isinstance(answers, str):
                answers = [answers]
            elif not isinstance(answers, list) or not answers:
                raise MalformedDataError(f"{where}: field `answer` must be a string or a non-empty list of strings")
            if not all(isinstance(answer, str) for answer in answers):
                raise MalformedDataError(f"{where}: field `answer` must hold strings only")
            if not answers[0].strip():
                raise MalformedDataError(f"{where}: field `answer` starts with an empty answer")
            yield {
                "id": record.get("id", line_number - 1),
                "context": record["input"],
                "question": record["prompt"],
                "answers": answers,
            }


def load_comi_jsonl(path: str | Path) -> Dataset:
    """Read and validate a COMI JSONL file into a `datasets.Dataset`.

    Columns: `id` (the line's `id` field, else its 0-based line index), `context`, `question`,
    `answers` (always a list; training uses the first).

    Raises:
        UsageError: no such file.
        MalformedDataError: a malformed line, naming the file, the line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"No such data file: {path}")
    rows = list(_rows(path))
    if not rows:
        raise MalformedDataError(f"{path}: no examples")
    ids = [row["id"] for row in rows]
    if any(type(identifier) is not type(ids[0]) for identifier in ids):
        # One column type for `datasets`: mixed ids are kept as strings.
        for row in rows:
            row["id"] = str(row["id"])
    return Dataset.from_list(rows)


def truncate_context(token_ids: list[int], max_tokens: int | None) -> list[int]:
    """Keep at most `max_tokens` context tokens: the first half and the last half.

    Middle truncation (as LongBench does) keeps both the opening of a document and its end,
    where the question's answer most often sits in QA data.
    """
    if max_tokens is None or len(token_ids) <= max_tokens:
        return token_ids
    head = max_tokens // 2
    return token_ids[:head] + token_ids[len(token_ids) - (max_tokens - head) :]


def tokenize_example(example: dict, tokenizer, max_context_tokens: int | None = None) -> dict:
    """As in the official code (docs/method.md): context, question and answer without special tokens;
    labels = first answer + EOS."""
    if tokenizer.eos_token_id is None:
        raise InvalidInputError("The tokenizer has no EOS token; COMI's labels end with one.", field="tokenizer")
    context = tokenizer(example["context"], add_special_tokens=False)["input_ids"]
    question = tokenizer(example["question"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(example["answers"][0], add_special_tokens=False)["input_ids"]
    return {
        "input_ids": truncate_context(context, max_context_tokens),
        "query_ids": question,
        "labels": answer + [tokenizer.eos_token_id],
    }


@dataclass
class COMIDataCollator:
    """Pads `input_ids`, `query_ids` (with masks) and `labels` (with -100) to the batch's longest.

    The model packs every sample without gaps, so the padding never changes a sample's result.
    Padding goes on the right; the pad id is 0 (it is masked everywhere, so any id would do).
    """

    pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key, mask_key in (("input_ids", "attention_mask"), ("query_ids", "query_attention_mask")):
            batch[key], batch[mask_key] = pad_token_lists([feature[key] for feature in features], self.pad_token_id)
        if "labels" in features[0]:
            batch["labels"] = pad_token_lists([feature["labels"] for feature in features], -100)[0]
        return batch


def word_level_tokenizer(words: list[str]):
    """A word-level tokenizer for tiny test and demonstration models: ids 0-2 are `<pad>`, `</s>`
    (EOS) and `<unk>`, then `words` in order; decoding joins the words with spaces. (No BOS token,
    as the official code tokenises without special tokens.)

    Text is NFKC-normalised and lower-cased, then split on whitespace and around every punctuation
    mark, so that "What is X?" reads as "what is x ?": a tiny vocabulary cannot afford a token per
    spelling. Each of `words` must therefore be one such piece (lower-case, no punctuation inside).

    Raises:
        ValueError: a word that the normalisation would change or split, which no text could reach.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(["<pad>", "</s>", "<unk>", *words])}
    word_level = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    # NFKC first so that compatibility forms (full-width "？", ligatures) reach their plain letters.
    word_level.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    word_level.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    _check_reachable(word_level, words)
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _check_reachable(word_level, words: list[str]) -> None:
    # A word the normaliser rewrites would be a dead row of the embedding matrix, and its text <unk>.
    for word in words:
        pieces = word_level.pre_tokenizer.pre_tokenize_str(word_level.normalizer.normalize_str(word))
        if [piece for piece, _ in pieces] != [word]:
            raise InvalidInputError(
                f"word_level_tokenizer: the word {word!r} reads as {[piece for piece, _ in pieces]} after "
                "normalisation (NFKC, lower case, punctuation split off): pass words as that leaves them",
                field="words",
            )
