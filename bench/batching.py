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

import argparse

import torch
from common import (
    add_model_arguments,
    backbone_description,
    machine_description,
    median_seconds,
    model_from_arguments,
    pyplot,
    quick_model_arguments,
    write_json,
)
from transformers import pipeline

from comi_hf.data import word_level_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--min_tokens", type=int, default=256)
    parser.add_argument("--max_tokens", type=int, default=4096)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--merge_size", type=int, default=16)
    add_model_arguments(parser)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    args = parser.parse_args()
    if args.quick:
        args.documents, args.min_tokens, args.max_tokens, args.batch_sizes = 8, 32, 256, [1, 4]
        args.max_new_tokens, args.repeats = 4, 1
        quick_model_arguments(args)

    words = [f"w{i}" for i in range(500)]
    tokenizer = word_level_tokenizer(words)
    model = model_from_arguments(args, max_positions=2 * args.max_tokens, merge_size=args.merge_size)
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
    backbone = backbone_description(args)
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
    write_json(args.json, results)
    if args.plot:
        plot(rows, args.plot)
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
