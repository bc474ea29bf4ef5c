"""Throughput of `pipeline("comi-qa")` at several batch sizes on contexts of mixed lengths.

`pipe(items, batch_size=b)` pads each batch's contexts to its longest one; COMI packs every
sample on its own after the encoder, so the answers do not depend on the batch (checked here),
but the encoder runs over the padding. This script answers the same documents (lengths drawn
uniformly between `--min_tokens` and `--max_tokens`) at each batch size, in one run (warm-up,
then the median of several repeats), and reports documents and context tokens per second.

    python bench/batching.py            # 32 documents of 256..4096 tokens, batch 1, 4, 16
    python bench/batching.py --quick    # a few seconds, for the test suite
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from common import (
    BackboneArguments,
    BenchArguments,
    machine_description,
    median_seconds,
    parse_arguments,
    pyplot,
    write_json,
)
from transformers import pipeline

from comi_hf.data import word_level_tokenizer


@dataclass
class BatchingArguments:
    documents: int = field(default=32, metadata={"help": "Documents answered at each batch size."})
    min_tokens: int = field(default=256, metadata={"help": "Shortest context (lengths are drawn uniformly)."})
    max_tokens: int = field(default=4096, metadata={"help": "Longest context."})
    batch_sizes: list[int] = field(
        default_factory=lambda: [1, 4, 16], metadata={"help": "The pipeline's batch sizes to compare."}
    )
    merge_size: int = field(default=16, metadata={"help": "COMI's merge size (compression ratio)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens generated per answer (EOS off)."})
    repeats: int = field(default=3, metadata={"help": "Timed runs after the warm-up; the median is reported."})


def main() -> None:
    args, backbone_args, bench = parse_arguments(__doc__, BatchingArguments, BackboneArguments, BenchArguments)
    if bench.quick:
        args.documents, args.min_tokens, args.max_tokens, args.batch_sizes = 8, 32, 256, [1, 4]
        args.max_new_tokens, args.repeats = 4, 1
        backbone_args.use_quick_sizes()

    words = [f"w{i}" for i in range(500)]
    tokenizer = word_level_tokenizer(words)
    model = backbone_args.model(max_positions=2 * args.max_tokens, merge_size=args.merge_size)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_tokens, args.max_tokens + 1, (args.documents,), generator=generator).tolist()

    def text(length: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (length,), generator=generator))

    items = [{"context": text(length), "question": text(12)} for length in lengths]
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": None}

    rows, answers = [], {}
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            answers[batch_size] = [result["answer"] for result in pipe(items, batch_size=batch_size, **options)]
            seconds = median_seconds(
                lambda batch_size=batch_size: pipe(items, batch_size=batch_size, **options), args.repeats
            )
            rows.append(
                {
                    "batch_size": batch_size,
                    "seconds": seconds,
                    "documents_per_second": args.documents / seconds,
                    "context_tokens_per_second": sum(lengths) / seconds,
                }
            )
    for row in rows:
        row["throughput_over_batch_1"] = rows[0]["seconds"] / row["seconds"]
    same = all(answer == answers[args.batch_sizes[0]] for answer in answers.values())
    backbone = backbone_args.description()
    results = {
        "documents": args.documents,
        "context_tokens": lengths,
        "merge_size": args.merge_size,
        "max_new_tokens": args.max_new_tokens,
        "backbone": backbone,
        "machine": machine_description("cpu"),
        "rows": rows,
        "same_answers": same,
    }
    print(
        f"{args.documents} documents of {min(lengths)}..{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), merge size {args.merge_size}, {args.max_new_tokens} new tokens"
    )
    print(f"backbone: {backbone}; {results['machine']}; median of {args.repeats}")
    print(f"{'batch':>5} | {'seconds':>8} | {'documents/s':>11} | {'context tokens/s':>16} | {'vs batch 1':>10}")
    for row in rows:
        print(
            f"{row['batch_size']:5d} | {row['seconds']:8.2f} | {row['documents_per_second']:11.2f} | "
            f"{row['context_tokens_per_second']:16.0f} | {row['throughput_over_batch_1']:9.2f}x"
        )
    print(f"same answers at every batch size: {same}")
    write_json(bench.json, results)
    if bench.plot:
        plot(rows, bench.plot)
    if not same:
        raise SystemExit("the answers changed with the batch size")


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.plot([row["batch_size"] for row in rows], [row["documents_per_second"] for row in rows], "o-")
    axis.set(xlabel="batch size", ylabel="documents per second", title="pipeline throughput, mixed lengths")
    axis.set_xscale("log", base=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
