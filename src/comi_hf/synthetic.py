"""Synthetic long-document QA in which redundancy is the obstacle (the case MIG is made for).

A document is a shuffled run of sentences of these kinds, about a target length in words:

* the target fact, once: "the code of red river is 4 8 2 1 ." (a paraphrase half of the time);
* distractor facts about *similar* entities (same noun or same adjective, other code), each
  repeated several times, near-duplicates of the target fact in every respect but one word;
* repetitive filler ("the weather was calm that day .").

The question asks for the target's code: it appears once in the document and cannot be guessed
without reading (chance level 1 / 10,000; picking any code of the document gives 1 / number of
codes). Every document is determined by its split's seed and its index; the splits use disjoint
seeds. Records are the official JSONL format (docs/method.md); every word is one token of a word-level
tokenizer built from `vocabulary()`.

    comi-synth --split train --num-docs 2000 --words 256 --output train.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from dataclasses import dataclass, field

from .errors_comi import InvalidInputError

__all__ = ["SPLIT_SEEDS", "FactSpan", "SyntheticDocument", "make_document", "make_split", "vocabulary"]

ADJECTIVES = ("red", "blue", "green", "old", "new", "dark", "white", "north", "south", "east", "west", "long")
NOUNS = ("river", "lake", "hill", "mill", "bridge", "stone", "forest", "tower", "field", "gate", "road", "well")
DIGITS = tuple(str(digit) for digit in range(10))
FILLER = (
    "the weather was calm that day .",
    "many people walked by the water .",
    "nothing else was written in the old book .",
    "a bird sang near the road .",
)
TEMPLATES = (
    "the code of {entity} is {code} .",
    "{entity} has the code {code} .",
)
QUESTION = "what is the code of {entity} ?"
# Disjoint seed ranges: no document of one split can be generated for another.
SPLIT_SEEDS = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}


@dataclass
class FactSpan:
    """Where one fact sentence names its entity and its code, as word (= token) offsets in the context."""

    entity_start: int
    code_start: int
    is_target: bool

    entity_words = 2
    code_words = 4


@dataclass
class SyntheticDocument:
    context: str
    question: str
    answer: str
    codes_in_document: int
    facts: list[FactSpan] = field(default_factory=list)

    def record(self) -> dict:
        """The official JSONL record (the answer with and without spaces as references)."""
        return {"input": self.context, "prompt": self.question, "answer": [self.answer, self.answer.replace(" ", "")]}


def vocabulary() -> list[str]:
    """Every word the generator can write (for a word-level tokenizer)."""
    words = set(ADJECTIVES) | set(NOUNS) | set(DIGITS)
    for sentence in (*FILLER, *TEMPLATES, QUESTION):
        words.update(word for word in sentence.split() if not word.startswith("{"))
    return sorted(words)


def _code(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(4))


def make_document(seed: int, words: int = 256, repeats: int = 3) -> SyntheticDocument:
    """One document of about `words` words (at least one target fact and one distractor)."""
    if words < 16:
        raise InvalidInputError(f"`words` must be at least 16, got {words}.")
    rng = random.Random(seed)
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    target = f"{adjective} {noun}"
    # Similar entities first (one word changed), then any others for long documents.
    similar = [f"{other} {noun}" for other in ADJECTIVES if other != adjective]
    similar += [f"{adjective} {other}" for other in NOUNS if other != noun]
    rng.shuffle(similar)
    others = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS if a != adjective and n != noun]
    rng.shuffle(others)
    similar += others
    target_code = _code(rng)
    codes = {target_code}
    # Each sentence is (template or None for filler, entity, code); text is written after shuffling.
    sentences = [(rng.choice(TEMPLATES), target, target_code)]
    length = len(sentences[0][0].split()) + 4
    # Distractors fill about 80% of the document (at least one), filler the rest.
    for entity in similar:
        if length >= words * 0.8 and len(codes) > 1:
            break
        code = _code(rng)
        while code in codes:
            code = _code(rng)
        codes.add(code)
        for _ in range(rng.randint(1, repeats)):
            template = rng.choice(TEMPLATES)
            sentences.append((template, entity, code))
            length += len(template.split()) + 4  # the placeholders stand for 2 + 4 words
            if length >= words * 0.8:
                break
    while length < words:
        filler = rng.choice(FILLER)
        sentences.append((None, filler, None))
        length += len(filler.split())
    rng.shuffle(sentences)
    texts, facts, offset = [], [], 0
    for template, entity, code in sentences:
        if template is None:
            texts.append(entity)
        else:
            template_words = template.split()
            entity_at = template_words.index("{entity}")
            code_at = template_words.index("{code}")
            # Words before a placeholder shift it; the entity (2 words) shifts a later code by 1.
            code_shift = FactSpan.entity_words - 1 if entity_at < code_at else 0
            entity_shift = FactSpan.code_words - 1 if code_at < entity_at else 0
            facts.append(FactSpan(offset + entity_at + entity_shift, offset + code_at + code_shift, entity == target))
            texts.append(template.format(entity=entity, code=code))
        offset += len(texts[-1].split())
    return SyntheticDocument(" ".join(texts), QUESTION.format(entity=target), target_code, len(codes), facts)


def make_split(split: str, num_docs: int, words: int = 256, repeats: int = 3) -> list[SyntheticDocument]:
    if split not in SPLIT_SEEDS:
        raise InvalidInputError(f"`split` must be one of {sorted(SPLIT_SEEDS)}, got {split!r}.")
    return [make_document(SPLIT_SEEDS[split] + index, words, repeats) for index in range(num_docs)]


def run(args: argparse.Namespace) -> None:
    """`comi-synth` with parsed arguments (see `comi_hf_cli.synth_parser`); problems are `COMIError`s.

    Documents are written as they are made, one line each, so memory stays that of one document.
    """
    from .errors_comi import UsageError

    if args.split not in SPLIT_SEEDS:
        raise UsageError(f"--split must be one of {sorted(SPLIT_SEEDS)}, got {args.split!r}")
    pick_any = 0.0
    try:
        with contextlib.ExitStack() as stack:
            out = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w", encoding="utf-8"))
            for index in range(args.num_docs):
                document = make_document(SPLIT_SEEDS[args.split] + index, args.words, args.repeats)
                out.write(json.dumps(document.record()) + "\n")
                pick_any += 1 / document.codes_in_document
            out.flush()
    except OSError as error:
        raise UsageError(f"cannot write {args.output}: {error.strerror or error}") from error
    print(
        f"{args.num_docs} {args.split} documents of ~{args.words} words; exact-match chance level 1/10000 = "
        f"{1e-4:.4f}; picking any code of the document: {pick_any / args.num_docs:.4f}",
        file=sys.stderr,
    )
