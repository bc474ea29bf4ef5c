"""SQuAD-style answer scoring (docs/method.md): exact match and token F1 against the best reference."""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["best_exact_match", "best_f1", "exact_match", "normalize_answer", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (0 when nothing is shared)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_exact_match(prediction: str, references: list[str]) -> float:
    return max(exact_match(prediction, reference) for reference in references)


def best_f1(prediction: str, references: list[str]) -> float:
    return max(token_f1(prediction, reference) for reference in references)
