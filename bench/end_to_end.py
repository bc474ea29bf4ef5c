"""Answer latency of COMI against reading the full context with the same decoder.

Both sides answer with `generate` (greedy, a fixed number of new tokens: EOS is switched off so
every run decodes the same count) from the same random model, whose backbone is shaped like
Qwen3-4B in depth and vocabulary but tiny in width (`common.qwen3_shaped_model`):

* full context: `model.decoder.generate(input_ids=[context ; query])`;
* COMI: `model.generate(input_ids=context, query_ids=query, merge_size=m)` (encoder over
  `[segment ; query]`, MIG compression, LSA, decoder over `[memory ; query]`).

Prefill is the time to the first new token and decode the time per further token, both read in
the same `generate` call from a streamer that stamps each new token as it arrives. COMI's
prefill is split into its parts by replaying the exact calls that one `compress` makes to the
encoder, the compressor (MIG) and the LSA. Peak extra memory is what torch allocates during one
answer, beyond the weights (CUDA: the allocator's peak; CPU: `comi_hf.memory_meter.PeakMemory`).
Every figure is the median of several runs after a warm-up, and the ratios are taken within one
run.

    python bench/end_to_end.py                 # 2K, 8K and 16K tokens; merge 4, 8, 16, 32
    python bench/end_to_end.py --context_tokens 32768 --merge_sizes 32
    python bench/end_to_end.py --device cuda --dtype bfloat16
    python bench/end_to_end.py --quick         # seconds, for the test suite
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from common import (
    BackboneArguments,
    BenchArguments,
    Dtype,
    TokenClock,
    machine_description,
    median_seconds,
    parse_arguments,
    pyplot,
    synchronize,
    write_json,
)
from memory_meter import PeakMemory


@dataclass
class EndToEndArguments:
    context_tokens: list[int] = field(
        default_factory=lambda: [2048, 8192, 16384], metadata={"help": "Context lengths in tokens."}
    )
    merge_sizes: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "COMI's merge sizes."})
    query_tokens: int = field(default=16, metadata={"help": "Tokens in the question."})
    new_tokens: int = field(default=20, metadata={"help": "Tokens generated per answer (EOS off)."})
    repeats: int = field(default=3, metadata={"help": "Timed runs after the warm-up; the median is reported."})
    device: str = field(default="cpu", metadata={"help": "Where the model runs (cpu, cuda)."})
    dtype: Dtype = field(default="float32", metadata={"help": "The model's dtype."})


def peak_extra_bytes(function, device: str) -> int:
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    with PeakMemory() as meter:
        function()
    return meter.peak


def latency(generate, new_tokens: int, args) -> dict:
    """Prefill, per-token decode and total time of `generate(max_new_tokens=...)`, and its memory.

    Each run is one `generate` call: prefill is the time to its first new token, decode the time
    from there to its last one per token, so neither can come out negative (as a difference of two
    runs' medians can on a noisy machine).
    """
    answer = generate(new_tokens)  # warm-up
    assert answer.shape[-1] == new_tokens, "EOS must not stop the benchmark early"
    runs = []
    for _ in range(args.repeats):
        clock = TokenClock()
        synchronize(args.device)
        start = time.perf_counter()
        generate(new_tokens, streamer=clock)
        synchronize(args.device)
        end = time.perf_counter()
        first, last = clock.times[-new_tokens], clock.times[-1]  # an earlier `put` may hand over the prompt
        runs.append((first - start, (last - first) / (new_tokens - 1), end - start))
    prefill, decode, total = (statistics.median(run[part] for run in runs) for part in range(3))
    return {
        "prefill_seconds": prefill,
        "decode_seconds_per_token": decode,
        "total_seconds": total,
        "peak_extra_bytes": peak_extra_bytes(lambda: generate(new_tokens), args.device),
    }


def compression_parts(model, context_ids, query_ids, merge_size: int, args) -> dict:
    """Seconds spent in the encoder, the MIG compressor and the LSA by one `compress` call."""
    calls = []
    parts = {"encoder": model.encoder, "mig": model.compressor, "lsa": model.lsa}
    hooks = [
        module.register_forward_pre_hook(
            lambda module, call_args, call_kwargs, name=name: calls.append((name, module, call_args, call_kwargs)),
            with_kwargs=True,
        )
        for name, module in parts.items()
    ]
    try:
        model.compress(context_ids, None, query_ids, None, merge_size)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        f"{name}_seconds": median_seconds(
            lambda name=name: [module(*a, **k) for part, module, a, k in calls if part == name],
            args.repeats,
            args.device,
        )
        for name in parts
    }


def main() -> None:
    args, backbone_args, bench = parse_arguments(__doc__, EndToEndArguments, BackboneArguments, BenchArguments)
    if bench.quick:
        args.context_tokens, args.merge_sizes, args.new_tokens, args.repeats = [256], [8], 3, 1
        backbone_args.use_quick_sizes()

    model = backbone_args.model(
        max_positions=2 * max(args.context_tokens),
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    options = {"do_sample": False, "repetition_penalty": 1.0, "eos_token_id": None}
    generator = torch.Generator().manual_seed(0)
    query_ids = torch.randint(3, backbone_args.vocab_size, (1, args.query_tokens), generator=generator).to(args.device)
    backbone = f"{backbone_args.description()}, {args.dtype}"
    print(f"{backbone}; {machine_description(args.device)}; {args.new_tokens} new tokens, median of {args.repeats}")
    print(
        f"{'tokens':>7} {'merge':>5} | {'prefill s':>9} {'decode ms/tok':>13} {'total s':>8} {'peak MiB':>9} | "
        f"{'speed-up':>8} {'prefill x':>9} | {'encoder s':>9} {'MIG % enc':>9} {'LSA s':>7}"
    )
    rows = []
    with torch.inference_mode():
        for length in args.context_tokens:
            context_ids = torch.randint(3, backbone_args.vocab_size, (1, length), generator=generator).to(args.device)
            prompt = torch.cat([context_ids, query_ids], dim=1)

            def full_context(new_tokens: int, prompt=prompt, **extra) -> torch.Tensor:
                out = model.decoder.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    **options,
                    **extra,
                )
                return out[:, prompt.shape[1] :]

            full = {"context_tokens": length, "method": "full context", **latency(full_context, args.new_tokens, args)}
            rows.append(full)
            print(
                f"{length:7d} {'-':>5} | {full['prefill_seconds']:9.3f} {full['decode_seconds_per_token'] * 1e3:13.2f} "
                f"{full['total_seconds']:8.3f} {full['peak_extra_bytes'] / 2**20:9.1f} |",
                flush=True,
            )
            for merge_size in args.merge_sizes:

                def comi(new_tokens: int, context_ids=context_ids, merge_size=merge_size, **extra) -> torch.Tensor:
                    return model.generate(
                        input_ids=context_ids,
                        query_ids=query_ids,
                        merge_size=merge_size,
                        max_new_tokens=new_tokens,
                        **options,
                        **extra,
                    )

                row = {
                    "context_tokens": length,
                    "method": "COMI",
                    "merge_size": merge_size,
                    **latency(comi, args.new_tokens, args),
                    **compression_parts(model, context_ids, query_ids, merge_size, args),
                }
                row["speedup"] = full["total_seconds"] / row["total_seconds"]
                row["prefill_speedup"] = full["prefill_seconds"] / row["prefill_seconds"]
                row["memory_saving"] = full["peak_extra_bytes"] / row["peak_extra_bytes"]
                row["mig_share_of_encoder"] = row["mig_seconds"] / row["encoder_seconds"]
                rows.append(row)
                print(
                    f"{length:7d} {merge_size:5d} | {row['prefill_seconds']:9.3f} "
                    f"{row['decode_seconds_per_token'] * 1e3:13.2f} {row['total_seconds']:8.3f} "
                    f"{row['peak_extra_bytes'] / 2**20:9.1f} | {row['speedup']:7.2f}x {row['prefill_speedup']:8.2f}x | "
                    f"{row['encoder_seconds']:9.3f} {100 * row['mig_share_of_encoder']:8.2f}% "
                    f"{row['lsa_seconds']:7.3f}",
                    flush=True,
                )
    write_json(
        bench.json,
        {
            "quick": bench.quick,
            "backbone": backbone,
            "machine": machine_description(args.device),
            "new_tokens": args.new_tokens,
            "query_tokens": args.query_tokens,
            "repeats": args.repeats,
            "rows": rows,
        },
    )
    if bench.plot:
        plot(rows, bench.plot)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    full = [row for row in rows if row["method"] == "full context"]
    left.loglog(
        [row["context_tokens"] for row in full], [row["total_seconds"] for row in full], "k-o", label="full context"
    )
    for merge_size in sorted({row["merge_size"] for row in rows if row["method"] == "COMI"}):
        series = [row for row in rows if row.get("merge_size") == merge_size]
        lengths = [row["context_tokens"] for row in series]
        left.loglog(lengths, [row["total_seconds"] for row in series], marker="o", label=f"COMI {merge_size}x")
        right.semilogx(lengths, [row["speedup"] for row in series], marker="o", label=f"COMI {merge_size}x")
    left.set(xlabel="context tokens", ylabel="seconds per answer", title="answer latency (generate)")
    right.set(xlabel="context tokens", ylabel="full context time / COMI time", title="speed-up over the full context")
    right.axhline(1.0, color="grey", linestyle="--")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
