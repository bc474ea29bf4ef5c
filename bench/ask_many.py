"""What does each extra question about one context cost, when they are asked together?

`pipe(context=..., questions=[q1, ..., qQ])` encodes the context once (the encoder is causal
and the query follows the context, so the context's hidden states and key/value cache are
shared) and runs only the query tokens, the compression and the decoding per question, all
questions in one batch. For Q = 1, 4, 16 questions this times that call against the median
single-question call `pipe(context=..., question=q)` on the same context, in one run (warm-up,
then the median of several repeats), and checks that every question gets the same answer both
ways. The cost of an extra question is `(t(Q) - t(1)) / (Q - 1)`, reported as a fraction of the
first question's `t(1)`.

    python bench/ask_many.py            # 8K-token context, Q = 1, 4, 16
    python bench/ask_many.py --quick    # a few seconds, for the test suite
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
class AskManyArguments:
    context_tokens: int = field(default=8192, metadata={"help": "Tokens in the one context."})
    questions: list[int] = field(
        default_factory=lambda: [1, 4, 16], metadata={"help": "Numbers Q of questions asked together."}
    )
    merge_size: int = field(default=16, metadata={"help": "COMI's merge size (compression ratio)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens generated per answer (EOS off)."})
    repeats: int = field(default=3, metadata={"help": "Timed runs after the warm-up; the median is reported."})


def main() -> None:
    args, backbone_args, bench = parse_arguments(__doc__, AskManyArguments, BackboneArguments, BenchArguments)
    if bench.quick:
        backbone_args.use_quick_sizes()
        args.context_tokens, args.questions, args.max_new_tokens, args.repeats = 512, [1, 4], 4, 1

    words = [f"w{i}" for i in range(500)]
    tokenizer = word_level_tokenizer(words)
    model = backbone_args.model(max_positions=2 * args.context_tokens, merge_size=args.merge_size)
    generator = torch.Generator().manual_seed(0)
    context = " ".join(words[i] for i in torch.randint(len(words), (args.context_tokens,), generator=generator))
    questions = [
        " ".join(words[i] for i in torch.randint(len(words), (12,), generator=generator))
        for _ in range(max(args.questions))
    ]
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": None}

    with torch.inference_mode():
        separate = [pipe(context=context, question=question, **options)["answer"] for question in questions]
        together = pipe(context=context, questions=questions, **options)["answers"]
        same = together == separate
        single = median_seconds(lambda: pipe(context=context, question=questions[0], **options), args.repeats)
        rows = []
        for count in args.questions:
            asked = questions[:count]
            seconds = median_seconds(
                lambda asked=asked: pipe(context=context, questions=asked, **options), args.repeats
            )
            rows.append({"questions": count, "seconds_together": seconds, "seconds_separate": count * single})
    first = rows[0]["seconds_together"] if rows[0]["questions"] == 1 else single
    for row in rows:
        row["speedup"] = row["seconds_separate"] / row["seconds_together"]
        if row["questions"] > 1:
            row["extra_question_share_of_first"] = (row["seconds_together"] - first) / (row["questions"] - 1) / first
    backbone = backbone_args.description()
    results = {
        "context_tokens": args.context_tokens,
        "merge_size": args.merge_size,
        "max_new_tokens": args.max_new_tokens,
        "backbone": backbone,
        "machine": machine_description("cpu"),
        "seconds_single_question_call": single,
        "rows": rows,
        "same_answers": same,
    }
    print(f"{args.context_tokens}-token context, merge size {args.merge_size}, {args.max_new_tokens} new tokens")
    print(f"backbone: {backbone}; {results['machine']}; median of {args.repeats}")
    print(f"one question, one call: {single:.3f} s")
    print(f"{'Q':>3} | {'questions=[Q]':>13} | {'Q calls':>8} | {'speed-up':>8} | {'each extra question':>19}")
    for row in rows:
        extra = row.get("extra_question_share_of_first")
        print(
            f"{row['questions']:3d} | {row['seconds_together']:11.3f} s | {row['seconds_separate']:6.2f} s | "
            f"{row['speedup']:7.2f}x | {'-' if extra is None else f'{100 * extra:.1f}% of the first':>19}"
        )
    print(f"same answers together and one by one: {same}")
    write_json(bench.json, results)
    if bench.plot:
        plot(rows, bench.plot)
    if not same:
        raise SystemExit("questions=[...] and separate calls gave different answers")


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(5.5, 4))
    counts = [row["questions"] for row in rows]
    axis.plot(counts, [row["seconds_separate"] for row in rows], "o-", label="one call per question")
    axis.plot(counts, [row["seconds_together"] for row in rows], "o-", label="questions=[...] (context encoded once)")
    axis.set(xlabel="questions about one context", ylabel="seconds", title="asking many questions")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
