"""The ablation table: what each part of MIG compression is worth, at the same memory budget.

    python research/ablation.py --output_dir ablation

Every variant answers the same held-out `comi-synth` test documents with the same model (by
default the package's default model, trained with full MIG) and the same number of memory
vectors per document:

* full MIG (the model's configuration);
* without redundancy (relevance only) in the coarse stage, in the fine stage, in both;
* without the coarse stage: equal groups, as many as the coarse stage starts from
  (`ceil(n / m)`), which is the coarse stage with both weights at 0 (every group the same score,
  so the same share). The model's own switch (`coarse_grained=False`) makes `round(n / m)` groups
  as the official code does, a smaller budget: 16.0 against 16.9 vectors on average at merge 16
  on 256-word documents, so it is not used here;
* without the fine stage: each group's plain mean;
* truncation: the document cut to `ceil(n / m)` tokens (first and last halves), each kept token
  its own memory vector;
* uncompressed: every token its own memory vector (the ceiling).

Every variant's mean number of memory vectors per document is recorded, and the table shows it:
the coarse stage drops a group whose share rounds to no token, so the MIG variants can keep a
few vectors fewer than `ceil(n / m)`, never more.

The stages are switched off at inference only: the model was trained with all of them, as in
the paper's ablation of a trained model's compressor. Writes `ablation.json` (one entry per
variant, length, merge size and document seed), `ablation.md` (mean exact match over seeds, with
the spread) and `ablation.png`.

For the compressing variants it also counts the documents whose target code was fused into a
memory vector together with digits of another fact's code, and the exact match on those and on
the rest: where a variant loses answers, this says whether fusion is what lost them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser

from comi_hf import COMIForConditionalGeneration
from comi_hf.data import COMIDataCollator, truncate_context
from comi_hf.loading import parse_script_arguments
from comi_hf.metrics import best_exact_match
from comi_hf.processing_comi import decode_answers
from comi_hf.synthetic import SPLIT_SEEDS, make_document

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "src" / "comi_hf" / "default_model"
# name -> config switches. The two per-token variants give every kept token its own vector
# (merge size 1) with the coarse stage off: at merge size 1 it would still move tokens between
# one-token groups and fuse some of them.
VARIANTS = {
    "full MIG": {},
    "no coarse redundancy": {"coarse_redundancy": False},
    "no fine redundancy": {"fine_redundancy": False},
    "no redundancy": {"coarse_redundancy": False, "fine_redundancy": False},
    "no coarse stage": {"alpha_select": 0.0, "beta_select": 0.0},
    "no fine stage (mean)": {"fine": False},
    "truncation": {"coarse": False},
    "uncompressed": {"coarse": False},
}
PER_TOKEN = ("truncation", "uncompressed")


@dataclass
class AblationArguments:
    output_dir: str = field(metadata={"help": "Where ablation.json, ablation.md and ablation.png go."})
    model: str = field(default=str(DEFAULT_MODEL), metadata={"help": "A COMI model (the package's by default)."})
    words: list[int] = field(default_factory=lambda: [256, 1024], metadata={"help": "Document lengths in words."})
    merge_sizes: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "Merge sizes."})
    num_docs: int = field(default=1000, metadata={"help": "Documents per seed."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Document seeds (disjoint sets)."})
    batch_size: int = field(default=50, metadata={"help": "Documents compressed and answered together."})
    quick: bool = field(default=False, metadata={"help": "8 documents of 64 words, merge 4 and 8: a smoke test."})


def documents(words: int, seed: int, count: int):
    """Held-out test documents; seed s takes its own block of the test split's seeds."""
    first = SPLIT_SEEDS["test"] + seed * 100_000_000
    return [make_document(first + index, words) for index in range(count)]


def memory_budget(context_tokens: int, merge_size: int) -> int:
    """How many vectors MIG keeps for a context at most: the groups the coarse stage starts from."""
    return math.ceil(context_tokens / merge_size)


@torch.inference_mode()
def score_variant(model, tokenizer, docs, variant: str, merge_size: int, batch_size: int) -> dict:
    """One variant on `docs`: `exact_match`, `memory_vectors` and `compression_ratio` (means), and
    for compressing variants `fused` (documents whose target code shares a memory vector with
    another code) and `fused_correct` (those of them answered exactly)."""
    collate = COMIDataCollator()
    per_token = variant in PER_TOKEN
    correct, ratio, vectors, fused, fused_correct = 0, 0.0, 0, 0, 0
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        features, full_lengths = [], []
        for document in chunk:
            context = tokenizer(document.context, add_special_tokens=False)["input_ids"]
            full_lengths.append(len(context))
            if variant == "truncation":
                context = truncate_context(context, memory_budget(len(context), merge_size))
            question = tokenizer(document.question, add_special_tokens=False)["input_ids"]
            features.append({"input_ids": context, "query_ids": question})
        batch = collate(features)
        memory, memory_mask, details = model.compress(
            **batch, merge_size=1 if per_token else merge_size, return_details=True, mig_options=VARIANTS[variant]
        )
        generated = model.generate(
            query_ids=batch["query_ids"],
            query_attention_mask=batch["query_attention_mask"],
            memory=(memory, memory_mask),
            max_new_tokens=5,  # 4 digits and EOS
        )
        answers = decode_answers(tokenizer, generated)
        for document, answer, full_length, kept, token_memory in zip(
            chunk, answers, full_lengths, memory_mask.sum(1).tolist(), details.token_memory, strict=True
        ):
            right = best_exact_match(answer, [document.answer])
            correct += right
            ratio += full_length / kept
            vectors += kept
            if not per_token and _target_code_fused(document, token_memory):
                fused += 1
                fused_correct += right
    result = {
        "exact_match": correct / len(docs),
        "memory_vectors": round(vectors / len(docs), 3),
        "compression_ratio": round(ratio / len(docs), 3),
    }
    if not per_token:
        result.update(fused=fused, fused_correct=fused_correct)
    return result


def _target_code_fused(document, token_memory: torch.Tensor) -> bool:
    """Whether a memory vector holding a digit of the target code also holds another code's digit
    (`token_memory`: the memory index of each context token; word offsets are token offsets)."""
    holders = {}
    for fact in document.facts:
        for memory in token_memory[fact.code_start : fact.code_start + fact.code_words].tolist():
            holders.setdefault(memory, set()).add(fact.is_target)
    return any(len(kinds) == 2 for kinds in holders.values())


def cell_scores(entries: list[dict], variant: str, words: int, merge: int) -> list[float]:
    """Exact match of one table cell, one value per document seed."""
    return [
        e["exact_match"]
        for e in entries
        if e["variant"] == variant and e["words"] == words and e["merge_size"] == merge
    ]


def markdown(entries: list[dict], words_list: list[int], merge_sizes: list[int]) -> str:
    lines = []
    for words in words_list:
        lines += [
            f"**{words}-word documents** (exact match, mean over {len({e['seed'] for e in entries})} document seeds "
            f"× {entries[0]['num_docs']} documents; ± half the spread between seeds)",
            "",
            "| variant | " + " | ".join(f"merge {m}" for m in merge_sizes) + " |",
            "| --- | " + " | ".join("---" for _ in merge_sizes) + " |",
        ]
        for variant in VARIANTS:
            cells = []
            for merge in merge_sizes:
                scores = cell_scores(entries, variant, words, merge)
                mean, spread = sum(scores) / len(scores), (max(scores) - min(scores)) / 2
                cells.append(f"{mean:.3f} ± {spread:.3f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Memory vectors per document ({words}-word documents, mean over every document; uncompressed: "
            "every token)",
            "",
            "| variant | " + " | ".join(f"merge {m}" for m in merge_sizes) + " |",
            "| --- | " + " | ".join("---" for _ in merge_sizes) + " |",
        ]
        for variant in VARIANTS:
            cells = []
            for merge in merge_sizes:
                cell = [
                    e for e in entries if e["variant"] == variant and e["words"] == words and e["merge_size"] == merge
                ]
                cells.append(f"{sum(e['memory_vectors'] for e in cell) / len(cell):.2f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Target code fused with another code's digits ({words}-word documents): share of documents, "
            "then exact match on those / on the rest",
            "",
            "| variant | " + " | ".join(f"merge {m}" for m in merge_sizes) + " |",
            "| --- | " + " | ".join("---" for _ in merge_sizes) + " |",
        ]
        for variant in VARIANTS:
            if variant in PER_TOKEN:
                continue
            cells = []
            for merge in merge_sizes:
                cell = [
                    e for e in entries if e["variant"] == variant and e["words"] == words and e["merge_size"] == merge
                ]
                docs = sum(e["num_docs"] for e in cell)
                fused = sum(e["fused"] for e in cell)
                fused_correct = sum(e["fused_correct"] for e in cell)
                apart_correct = sum(round(e["exact_match"] * e["num_docs"]) for e in cell) - fused_correct
                cells.append(
                    f"{fused / docs:.1%} ({_ratio(fused_correct, fused)} / {_ratio(apart_correct, docs - fused)})"
                )
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "–"


def plot(entries: list[dict], words_list: list[int], merge_sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(words_list), figsize=(5.5 * len(words_list), 4), squeeze=False)
    for axis, words in zip(axes[0], words_list, strict=True):
        for variant in VARIANTS:
            means = []
            for merge in merge_sizes:
                scores = cell_scores(entries, variant, words, merge)
                means.append(sum(scores) / len(scores))
            style = "--" if variant in PER_TOKEN else "-"
            axis.plot(merge_sizes, means, style, marker="o", label=variant)
        axis.set_xscale("log", base=2)
        axis.set_xticks(merge_sizes, [str(m) for m in merge_sizes])
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("merge size (compression ratio)")
        axis.set_ylabel("exact match")
        axis.set_title(f"{words}-word documents")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(AblationArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser, argv)
    if args.quick:
        args.words, args.merge_sizes, args.num_docs = [64], [4, 8], 8

    model = COMIForConditionalGeneration.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    entries, started = [], time.monotonic()
    jobs = [(w, s, v, m) for w in args.words for s in args.seeds for v in VARIANTS for m in args.merge_sizes]
    cache = {}
    for words, seed, variant, merge in tqdm(jobs, desc="Ablation", unit="cell"):
        docs = documents(words, seed, args.num_docs)
        key = (words, seed, variant, None if variant == "uncompressed" else merge)
        if key not in cache:  # the uncompressed ceiling does not depend on the merge size
            cache[key] = score_variant(model, tokenizer, docs, variant, merge, args.batch_size)
        entries.append(
            {"variant": variant, "words": words, "merge_size": merge, "seed": seed, "num_docs": len(docs), **cache[key]}
        )
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "command": "python research/ablation.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "entries": entries,
    }
    (output / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "ablation.md").write_text(markdown(entries, args.words, args.merge_sizes))
    plot(entries, args.words, args.merge_sizes, output / "ablation.png")
    print((output / "ablation.md").read_text())
    return result


if __name__ == "__main__":
    main()
