"""Time and peak extra memory of `mig_compress` against context length, beside a padded baseline.

For each hidden size, merge size and allocation (uniform: a random query; skewed: the query
points away from one group's tokens and alpha_select is large, so that one reallocated group
holds most of the context), this times `mig_compress` (warm-up, median of repeats) and measures the extra memory
its torch ops allocate. The baseline lays the reallocated groups out as the official code does,
padded to the longest group `(groups x longest x hidden)`, and computes the fine stage on it;
it is skipped where that layout would not fit in `--baseline_limit_gb`. The time exponent is the
slope of log(time) against log(length).

    python bench/compressor.py               # 1K..128K tokens, hidden 1024 and 4096, merge 4/16/32
    python bench/compressor.py --quick       # seconds
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from common import BenchArguments, machine_description, median_seconds, parse_arguments, pyplot, write_json
from memory_meter import PeakMemory

from comi_hf import mig_compress


@dataclass
class CompressorArguments:
    lengths: list[int] = field(
        default_factory=lambda: [1024, 4096, 16384, 65536, 131072], metadata={"help": "Context lengths in tokens."}
    )
    hidden: list[int] = field(default_factory=lambda: [1024, 4096], metadata={"help": "Hidden sizes."})
    merge_sizes: list[int] = field(default_factory=lambda: [4, 16, 32], metadata={"help": "Merge sizes."})
    repeats: int = field(default=3, metadata={"help": "Timed runs after the warm-up; the median is reported."})
    max_call_seconds: float = field(default=10.0, metadata={"help": "Stop a series before a call could take longer."})
    baseline_limit_gb: float = field(
        default=4.0, metadata={"help": "Skip the padded baseline where its layout would need more (GiB)."}
    )


def padded_baseline(states: torch.Tensor, query: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """The official layout: groups padded to the longest, similarities (groups x longest x longest)."""
    longest, hidden = max(group_sizes), states.shape[-1]
    padded = states.new_zeros(len(group_sizes), longest, hidden)
    mask = torch.zeros(len(group_sizes), longest, dtype=torch.bool)
    start = 0
    for group, size in enumerate(group_sizes):
        padded[group, :size] = states[start : start + size]
        mask[group, :size] = True
        start += size
    unit = torch.nn.functional.normalize(padded, dim=-1)
    relevance = unit @ torch.nn.functional.normalize(query, dim=-1)
    similarity = torch.bmm(unit, unit.transpose(1, 2))
    similarity.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    similarity.masked_fill_(~mask[:, None, :], 0)
    weights = torch.softmax((relevance - similarity.amax(-1)).masked_fill(~mask, -math.inf), dim=-1)
    return (weights[..., None] * padded).sum(1)


def fitted_exponent(lengths: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) on log(length); None for a series of one length."""
    if len(set(lengths)) < 2:
        # A series stops after its first length when that call was already slow (a busy machine).
        return None
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


def describe_exponent(exponent: float | None) -> str:
    return "n/a (one length)" if exponent is None else f"{exponent:.2f}"


def repeats_for(states: torch.Tensor, args: CompressorArguments) -> int:
    # Inputs over 256 MiB take seconds a call: one timed run after the warm-up is enough there.
    return 1 if states.nbytes > 2**28 else args.repeats


def measure(hidden: int, merge_size: int, allocation: str, length: int, args: CompressorArguments) -> dict:
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, length, hidden, generator=generator)
    if allocation == "uniform":
        query, weights = torch.randn(1, hidden, generator=generator), {}
    else:
        # A query pointing away from one group's tokens gives that group the lowest score, and
        # with a large alpha_select nearly all the budget: it holds most of the context.
        region = slice(3 * merge_size, 4 * merge_size)
        query, weights = -states[:, region].mean(1), {"alpha_select": 40.0}
    seconds = median_seconds(lambda: mig_compress(states, query, merge_size, **weights), repeats_for(states, args))
    meter = PeakMemory()
    with meter:
        _, _, details = mig_compress(states, query, merge_size, return_details=True, **weights)
    sizes = torch.bincount(details.token_memory[0]).tolist()
    row = {
        "hidden": hidden,
        "merge_size": merge_size,
        "allocation": allocation,
        "length": length,
        "longest_group": max(sizes),
        "seconds": seconds,
        "peak_extra_bytes": meter.peak,
        "peak_extra_over_input": meter.peak / states.nbytes,
    }
    layout_bytes = len(sizes) * max(sizes) * (hidden + max(sizes)) * 4
    if layout_bytes > args.baseline_limit_gb * 2**30:
        row["baseline_skipped_gb"] = layout_bytes / 2**30
        return row
    baseline = PeakMemory()
    with baseline:
        padded_baseline(states[0], query[0], sizes)
    row["baseline_seconds"] = median_seconds(
        lambda: padded_baseline(states[0], query[0], sizes), repeats_for(states, args)
    )
    row["baseline_peak_extra_over_input"] = baseline.peak / states.nbytes
    return row


def key_of(row: dict) -> str:
    return f"d={row['hidden']},m={row['merge_size']},{row['allocation']}"


def describe(row: dict) -> str:
    text = (
        f"d={row['hidden']:5d} m={row['merge_size']:3d} {row['allocation']:8s} n={row['length']:7d} "
        f"longest={row['longest_group']:6d} {row['seconds'] * 1e3:9.1f} ms  extra {row['peak_extra_over_input']:.2f}x"
    )
    if "baseline_seconds" in row:
        return text + f" | padded {row['baseline_seconds'] * 1e3:9.1f} ms, {row['baseline_peak_extra_over_input']:.2f}x"
    return text + f" | padded: skipped, needs {row['baseline_skipped_gb']:.1f} GiB"


def plot(rows: list[dict], exponents: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in exponents:
        series = [row for row in rows if key_of(row) == key]
        lengths = [row["length"] for row in series]
        left.loglog(
            lengths,
            [row["seconds"] for row in series],
            marker="o",
            label=f"{key} (slope {describe_exponent(exponents[key])})",
        )
        right.semilogx(lengths, [row["peak_extra_over_input"] for row in series], marker="o", label=key)
    left.set(xlabel="context tokens", ylabel="seconds", title="mig_compress time")
    right.set(xlabel="context tokens", ylabel="peak extra memory / input size", title="mig_compress memory")
    right.axhline(1.0, color="grey", linestyle="--")
    left.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args, bench = parse_arguments(__doc__, CompressorArguments, BenchArguments)
    if bench.quick:
        args.lengths, args.hidden, args.merge_sizes, args.repeats = [1024, 4096], [64], [16], 1

    rows = []
    with torch.no_grad():
        for hidden in args.hidden:
            for merge_size in args.merge_sizes:
                for allocation in ("uniform", "skewed"):
                    for index, length in enumerate(args.lengths):
                        rows.append(measure(hidden, merge_size, allocation, length, args))
                        print(describe(rows[-1]), flush=True)
                        # The coarse stage compares every pair of groups, and the fine stage every
                        # pair of tokens in a group: extrapolate quadratically, and stop a series
                        # before a call that would take longer than the cap.
                        following = args.lengths[index + 1 : index + 2]
                        if following and rows[-1]["seconds"] * (following[0] / length) ** 2 > args.max_call_seconds:
                            print(f"  longer contexts skipped: a call could take over {args.max_call_seconds} s")
                            break
    exponents = {}
    for key in dict.fromkeys(key_of(row) for row in rows):
        series = [row for row in rows if key_of(row) == key]
        exponents[key] = fitted_exponent([row["length"] for row in series], [row["seconds"] for row in series])
        print(f"time exponent {key}: {describe_exponent(exponents[key])}")
    worst = max(row["peak_extra_over_input"] for row in rows)
    print(f"largest peak extra memory: {worst:.2f}x the input hidden states")
    results = {
        "rows": rows,
        "time_exponents": exponents,
        "max_peak_extra_over_input": worst,
        "machine": machine_description("cpu"),
    }
    write_json(bench.json, results)
    if bench.plot:
        plot(rows, exponents, bench.plot)


if __name__ == "__main__":
    main()
