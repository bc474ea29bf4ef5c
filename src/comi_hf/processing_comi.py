"""Text in, text out: COMI's inputs checked at one edge, and its answers shaped for callers.

COMI answers questions about contexts. Whoever receives them — `generate(context=, query=)`,
`pipeline("comi-qa")`, the serving client, `comi-qa`, `comi-serve` — hands them to
[`prepare_inputs`] (or, for one text, [`token_ids_of`]), which checks and normalises them the
same way everywhere: a context or question is a non-empty text or a non-empty list of token
ids inside the model's vocabulary; anything else is an [`InvalidInputError`] naming the field.
Token-id tensors get the same checks in [`real_token_mask`]. Answers come back through
[`decode_answers`] and [`answer_records`], in the shape of `pipeline("comi-qa")`.

This file is shipped as remote code beside saved models, so it imports nothing from the
`comi_hf` package.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from dataclasses import dataclass

import torch

from .errors_comi import ContextTooLongError, InvalidInputError, describe_value

__all__ = [
    "MAX_MERGE_SIZE",
    "COMIInput",
    "StreamedAnswer",
    "UnknownTokensWarning",
    "answer_records",
    "check_decoder_positions",
    "check_merge_size",
    "check_text",
    "check_vocabulary",
    "decode_answers",
    "decoder_positions",
    "encode_texts",
    "gather_inputs",
    "prepare_inputs",
    "pad_token_lists",
    "real_token_mask",
    "token_ids_of",
]

# Tokens per memory vector at most: any larger value gives one memory vector per segment anyway,
# and index arithmetic on larger ones overflows torch's int64.
MAX_MERGE_SIZE = 2**31 - 1
# A text whose tokens are this share unknown (`<unk>`) or more is mostly unreadable to the model.
UNKNOWN_SHARE_WARNING = 0.2
# Characters that show nothing: whitespace, controls, format characters (zero-width spaces,
# joiners, marks), unassigned and private-use code points.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cn", "Co", "Zs", "Zl", "Zp"}


class UnknownTokensWarning(UserWarning):
    """Many of a text's tokens are unknown to the tokenizer: the model cannot read that text."""


@dataclass
class COMIInput:
    """One context and the questions about it, as token ids, checked.

    Attributes:
        context_ids: the context's token ids.
        question_ids: each question's token ids.
        several: the input gave `questions` (a list), not one `question`: the result holds lists.
    """

    context_ids: list[int]
    question_ids: list[list[int]]
    several: bool = False


# ---------------------------------------------------------------------- values
def check_merge_size(merge_size: object, field: str = "merge_size") -> int:
    """`merge_size` if it is an integer from 1 to `MAX_MERGE_SIZE` (the tokens per memory vector)."""
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or not 1 <= merge_size <= MAX_MERGE_SIZE:
        raise InvalidInputError(
            f"`{field}` must be an integer from 1 to {MAX_MERGE_SIZE}, got {merge_size!r:.40}.", field=field
        )
    return merge_size


def check_text(text: object, field: str, where: str = "") -> str:
    """`text` (without a leading byte-order mark) if it is a string of valid Unicode that shows at
    least one character."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{where}`{field}` must be a string, got {describe_value(text)}.", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInputError(
            f"{where}`{field}` is not valid Unicode text: it holds a lone surrogate (U+{ord(text[error.start]):04X}) "
            f"at character {error.start}.",
            field=field,
        ) from None
    if all(unicodedata.category(character) in _INVISIBLE_CATEGORIES for character in text):
        raise InvalidInputError(f"{where}`{field}` is empty (it has no visible character).", field=field)
    # A byte-order mark is an encoding's, not the text's (files read by comi-qa drop it too).
    return text.removeprefix("\ufeff")


def check_vocabulary(ids: torch.Tensor | list[int], field: str, vocab_size: int, where: str = "") -> None:
    """Refuse token ids outside `[0, vocab_size)`."""
    if isinstance(ids, list):  # Python ints may exceed what a tensor holds
        outside = sorted({token for token in ids if not 0 <= token < vocab_size})
        if outside:
            raise InvalidInputError(
                f"{where}`{field}` holds token ids outside the model's vocabulary of {vocab_size} (e.g. "
                f"{outside[:5]}); were they made with another tokenizer?",
                field=field,
            )
        return
    ids = torch.as_tensor(ids)
    outside = (ids < 0) | (ids >= vocab_size)
    if bool(outside.any()):
        examples = ids[outside].unique()[:5].tolist()
        raise InvalidInputError(
            f"{where}`{field}` holds token ids outside the model's vocabulary of {vocab_size} (e.g. {examples}); "
            "were they made with another tokenizer?",
            field=field,
        )


def token_ids_of(value: object, field: str, tokenizer, vocab_size: int, where: str = "") -> list[int]:
    """The token ids of a context or question given as text or as a list of ids, checked.

    Text is tokenised without special tokens (as the official code does); a text of which a
    large share of tokens is unknown to the tokenizer gives an [`UnknownTokensWarning`].
    `where` prefixes messages (e.g. `"input 2: "`).
    """
    if isinstance(value, str):
        ids = tokenizer(check_text(value, field, where), add_special_tokens=False)["input_ids"]
        _warn_unknown_tokens(ids, f"{where}`{field}`", tokenizer)
    elif isinstance(value, (list, tuple)) and all(type(i) is int for i in value):
        ids = list(value)
    else:
        raise InvalidInputError(
            f"{where}`{field}` must be a string or a list of token ids (int), got {describe_value(value)}.",
            field=field,
        )
    if not ids:
        raise InvalidInputError(f"{where}`{field}` has no tokens.", field=field)
    check_vocabulary(ids, field, vocab_size, where)
    return ids


def _warn_unknown_tokens(ids: list[int], field: str, tokenizer) -> None:
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    if unknown_id is None or not ids:
        return
    unknown = sum(1 for token in ids if token == unknown_id)
    if unknown / len(ids) >= UNKNOWN_SHARE_WARNING:
        warnings.warn(
            f"{unknown} of the {len(ids)} tokens of {field} are unknown to the tokenizer "
            f"({tokenizer.unk_token}): the model cannot read them, and its answer may be wrong.",
            UnknownTokensWarning,
            stacklevel=3,
        )


def real_token_mask(ids: object, mask: object, ids_field: str, mask_field: str, vocab_size: int) -> torch.Tensor:
    """The `(batch, len)` bool mask of real tokens of a batch of token ids, checked: `ids` a
    non-empty `(batch, len)` integer tensor, `mask` (`None`: every token is real) of the same shape
    holding 0 and 1 only, and the ids below `vocab_size` wherever the mask is 1."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise InvalidInputError(
            f"`{ids_field}` must be a (batch, length) tensor of token ids, got {describe_value(ids)}.", field=ids_field
        )
    if ids.shape[0] == 0:
        raise InvalidInputError(f"`{ids_field}` is an empty batch.", field=ids_field)
    if mask is None:
        real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise InvalidInputError(
            f"`{mask_field}` must have the shape of `{ids_field}` {tuple(ids.shape)}, got {describe_value(mask)}.",
            field=mask_field,
        )
    else:
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            values = mask[(mask != 0) & (mask != 1)].unique()[:5].tolist()
            raise InvalidInputError(
                f"`{mask_field}` must hold 0 (padding) and 1 (real tokens) only, got {values}.", field=mask_field
            )
        real = mask.to(ids.device) != 0
    check_vocabulary(ids[real], ids_field, vocab_size)
    return real


# ---------------------------------------------------------------------- inputs
def gather_inputs(inputs: object = None, context: object = None, question: object = None, questions: object = None):
    """The inputs of a `comi-qa` call: given positionally (a dict or a list of dicts), or as
    `context=` with `question=` or `questions=` (then one dict)."""
    if inputs is None:
        if context is None:
            raise InvalidInputError(
                "Give a `context` and a `question` (or `questions`), or a list of such dicts.", field="context"
            )
        inputs = {"context": context}
        if question is not None:
            inputs["question"] = question
        if questions is not None:
            inputs["questions"] = questions
    elif context is not None or question is not None or questions is not None:
        raise InvalidInputError("Give the inputs either positionally or as `context=`/`question=`, not both.")
    return inputs


def prepare_inputs(
    inputs: object,
    tokenizer,
    vocab_size: int,
    *,
    max_context_tokens: int | None = None,
) -> list[COMIInput]:
    """Check and tokenise `comi-qa` inputs: a dict `{"context", "question"}` (or `"questions"`: a
    non-empty list) or a non-empty list of such dicts; texts or token-id lists.

    Raises [`InvalidInputError`] naming the input and field at fault, and [`ContextTooLongError`]
    for a context of more than `max_context_tokens` tokens.
    """
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise InvalidInputError("Got an empty list of inputs; give at least one {'context': ..., 'question': ...}.")
    prepared = []
    for position, item in enumerate(items):
        where = f"input {position}: " if isinstance(inputs, (list, tuple)) else ""
        if not isinstance(item, dict):
            raise InvalidInputError(
                f"{where}an input must be a dict with `context` and `question`, got {describe_value(item)}."
            )
        unknown = sorted(set(item) - {"context", "question", "questions"})
        if unknown:
            raise InvalidInputError(
                f"{where}unknown key(s) {unknown}; an input has `context` and `question` (or `questions`).",
                field=unknown[0],
            )
        if "context" not in item:
            raise InvalidInputError(f"{where}`context` is missing.", field="context")
        if ("question" in item) == ("questions" in item):
            raise InvalidInputError(f"{where}give exactly one of `question` and `questions`.", field="question")
        context_ids = token_ids_of(item["context"], "context", tokenizer, vocab_size, where)
        if max_context_tokens is not None and len(context_ids) > max_context_tokens:
            raise ContextTooLongError(
                f"{where}the context has {len(context_ids)} tokens, more than the limit of {max_context_tokens}.",
                field="context",
            )
        several = "questions" in item
        asked = item["questions"] if several else [item["question"]]
        if several and (not isinstance(asked, (list, tuple)) or not asked):
            raise InvalidInputError(
                f"{where}`questions` must be a non-empty list, got {describe_value(asked)}.", field="questions"
            )
        question_ids = [
            token_ids_of(question, f"questions[{number}]" if several else "question", tokenizer, vocab_size, where)
            for number, question in enumerate(asked)
        ]
        prepared.append(COMIInput(context_ids, question_ids, several))
    return prepared


def decoder_positions(config, context_tokens: int, query_tokens: int, merge_size: int, new_tokens: int = 0) -> int:
    """The most positions the decoder reads for one question: memory vectors (at most
    `ceil(len / merge_size)` per segment of the context), the question's tokens and the new tokens."""
    segment = config.segment_size
    full, rest = divmod(context_tokens, segment)
    memory = full * math.ceil(segment / merge_size) + math.ceil(rest / merge_size)
    return memory + query_tokens + new_tokens


def check_decoder_positions(
    config, context_tokens: int, query_tokens: int, merge_size: int, new_tokens: int = 0
) -> None:
    """Refuse, before any encoding, a context whose memory would take the decoder past its
    `max_position_embeddings`, naming both numbers (what `comi-qa` and `comi-serve` do; `generate`
    and the pipeline warn instead)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    needed = decoder_positions(config, context_tokens, query_tokens, merge_size, new_tokens)
    if limit is not None and query_tokens + new_tokens >= limit:
        raise InvalidInputError(
            f"the question ({query_tokens} tokens) and {new_tokens} new tokens alone take more than the decoder's "
            f"max_position_embeddings of {limit}: ask for fewer new tokens.",
            field="max_new_tokens",
        )
    if limit is not None and needed > limit:
        segments = math.ceil(context_tokens / config.segment_size)
        raise ContextTooLongError(
            f"the context has {context_tokens} tokens ({segments} segment(s) of up to {config.segment_size}); at "
            f"merge size {merge_size} the decoder would read up to {needed} positions (memory, question and "
            f"{new_tokens} new tokens), more than its max_position_embeddings of {limit}. Use a larger merge size "
            "or a shorter context.",
            field="context",
        )


# ---------------------------------------------------------------------- text
def pad_token_lists(sequences: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids as a `(len(sequences), longest)` long tensor right-padded with `value`, and the
    `(len(sequences), longest)` mask of real entries (1) and padding (0)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def encode_texts(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `(len(texts), longest)` and attention mask, without special tokens (as the
    official code does), right-padded with id 0: COMI masks padding everywhere, so this works for
    tokenizers that have no pad token (Llama, Mistral)."""
    return pad_token_lists(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def decode_answers(tokenizer, sequences) -> list[str]:
    """Answer texts of generated token ids (special tokens dropped, surrounding spaces stripped)."""
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


class StreamedAnswer:
    """An answer's text as its tokens arrive: each [`add`] returns the text that is now certain,
    [`finish`] the rest; the pieces joined are `decode_answers` of all the tokens.

    What may still change is held back: whitespace at the end (the answer is stripped) and an
    incomplete character (a byte-level token that ends inside a UTF-8 sequence decodes to U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = ""

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).strip().rstrip("\ufffd").rstrip()
        return self._advance(text)

    def finish(self) -> str:
        (text,) = decode_answers(self.tokenizer, [self.token_ids])
        return self._advance(text)

    def _advance(self, text: str) -> str:
        # Decoding a longer sequence can rewrite its end (a tokenizer's clean-up of spaces before
        # punctuation); text already sent stays, and what follows waits until it extends it.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


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
