r"""COMI against its peers on the same backbone and documents, at the same budget, in one run.

For each merge size m, every method answers the same documents with n/m of each document's n
context tokens kept per decoder layer:

* COMI (a COMI model built from the backbone; the package's default model by default) at merge m:
  at most ceil(n/m) memory vectors, which pass through every decoder layer;
* kvpress's presses (SnapKV, ExpectedAttention, StreamingLLM, Knorm, TOVA, and a random press as
  the floor) on the backbone, through kvpress's own pipeline, keeping exactly ceil(n/m) KV entries
  per layer and head: in kvpress's default, question-agnostic setting (the context compressed
  alone) and with the question compressed together with the context (kvpress's evaluation's
  `compress_questions`);
* truncation of the context to its first and to its last ceil(n/m) tokens;
* the backbone with the full context (the ceiling).

Greedy decoding, no repetition penalty (kvpress's decoding has none), exact match against the
best reference (the project's metric), the time to the first answer token and per further token
(one document at a time, one torch thread, in both environments), and the KV entries or memory
vectors each keeps. kvpress pins transformers < 5.3, so its side runs in its own environment
(`.ci/kvpress_venv.sh`; `--kvpress_python`) as a subprocess, exchanging token ids and answers as
JSON; the backbone directory loads in both transformers versions.

    python bench/peers.py                                    # 500 test documents of 256 words (the recipe's seeds)
    python bench/peers.py --backbone Qwen/Qwen2.5-7B-Instruct --comi_model MY_COMI --data my.jsonl \
        --device cuda --dtype bfloat16
    python bench/peers.py --quick                            # a smoke test of the script: not a measurement
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import BenchArguments, Dtype, TokenClock, parse_arguments, pyplot, write_json
from server_processes import venv_python
from transformers import AutoTokenizer

from comi_hf import DEFAULT_BACKBONE, DEFAULT_MODEL, COMIForConditionalGeneration
from comi_hf.data import load_comi_jsonl
from comi_hf.metrics import best_exact_match
from comi_hf.processing_comi import decode_answers
from comi_hf.synthetic import SPLIT_SEEDS, make_document

WORKER = Path(__file__).resolve().parent / "kvpress" / "worker.py"
DEFAULT_KVPRESS_VENV = Path.home() / ".cache" / "comi_hf" / "venvs" / "kvpress"
# SnapKV observes the last `window_size` positions of what it compresses; its default (64) is
# larger than most budgets here (it then keeps an arbitrary part of that window): 8 covers a question.
PRESSES = {
    "SnapKV": ("SnapKVPress", {"window_size": 8}),
    "ExpectedAttention": ("ExpectedAttentionPress", {}),
    "StreamingLLM": ("StreamingLLMPress", {}),
    "Knorm": ("KnormPress", {}),
    "TOVA": ("TOVAPress", {}),
    "Random": ("RandomPress", {"seed": 0}),  # seeded: the pipeline check can compare it
}
MODES = ("context", "with question")


def find_kvpress_python() -> str | None:
    """The Python of kvpress's environment ($COMI_KVPRESS_VENV, else the default place), if kvpress imports there."""
    return venv_python(os.environ.get("COMI_KVPRESS_VENV", DEFAULT_KVPRESS_VENV), "import kvpress")


@dataclass
class PeersArguments:
    backbone: str = field(
        default=DEFAULT_BACKBONE, metadata={"help": "The backbone COMI was built from (a causal LM)."}
    )
    comi_model: str = field(default=DEFAULT_MODEL, metadata={"help": "A COMI model of that backbone."})
    data: str | None = field(
        default=None, metadata={"help": "A JSONL in the official format (without it: comi-synth's test split)."}
    )
    num_docs: int = field(default=500, metadata={"help": "Documents answered by every method."})
    words: int = field(default=256, metadata={"help": "comi-synth document length, without --data."})
    merge_sizes: list[int] = field(
        default_factory=lambda: [4, 8, 16, 32], metadata={"help": "Merge sizes (context tokens per kept entry)."}
    )
    presses: list[str] = field(
        default_factory=lambda: list(PRESSES), metadata={"choices": list(PRESSES), "help": "kvpress's presses to run."}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={
            "choices": list(MODES),
            "help": "What each press compresses: the context alone, or with the question.",
        },
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Longest answer (greedy)."})
    check_pipeline: int = field(
        default=20, metadata={"help": "Documents on which kvpress's own pipeline() must give the worker's answers."}
    )
    device: str = field(default="cpu", metadata={"help": "Where the models run (cpu, cuda)."})
    dtype: Dtype = field(default="float32", metadata={"help": "The models' dtype."})
    kvpress_python: str | None = field(
        default_factory=find_kvpress_python, metadata={"help": "The Python of kvpress's environment."}
    )
    markdown: str | None = field(default=None, metadata={"help": "Write the tables here (Markdown)."})


def load_documents(args, tokenizer) -> list[dict]:
    if args.data:
        dataset = load_comi_jsonl(args.data)
        records = [
            {"context": row["context"], "question": row["question"], "answers": row["answers"]}
            for row in dataset.select(range(min(args.num_docs, len(dataset))))
        ]
    else:
        first = SPLIT_SEEDS["test"]
        records = []
        for index in range(args.num_docs):
            document = make_document(first + index, args.words)
            records.append({"context": document.context, "question": document.question, "answers": [document.answer]})
    for record in records:
        record["context_ids"] = tokenizer(record["context"], add_special_tokens=False)["input_ids"]
        record["question_ids"] = tokenizer(record["question"], add_special_tokens=False)["input_ids"]
    return records


@torch.inference_mode()
def run_comi(model, tokenizer, documents: list[dict], merge_size: int, args) -> dict:
    """COMI one document at a time: answers, time to the first token, per further token, vectors."""
    device = next(model.parameters()).device
    record = {"label": f"COMI, merge {merge_size}", "answers": [], "first_token_seconds": []}
    record["decode_seconds_per_token"], record["kept_kv"] = [], []
    eos = model.generation_config.eos_token_id
    for position in range(-1, len(documents)):  # -1: a warm-up on the first document, untimed
        document = documents[max(position, 0)]
        context = torch.tensor([document["context_ids"]], device=device)
        query = torch.tensor([document["question_ids"]], device=device)
        clock, start = TokenClock(), time.perf_counter()
        memory, memory_mask = model.compress(context, None, query, None, merge_size)
        options = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "repetition_penalty": 1.0}
        tokens = model.generate(query_ids=query, memory=(memory, memory_mask), streamer=clock, **options)[0].tolist()
        if position < 0:
            continue
        steps = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        new = clock.times[-len(tokens) :]  # an earlier `put` may hand over the (empty) prompt
        record["answers"].append(decode_answers(tokenizer, [tokens])[0])
        record["first_token_seconds"].append(new[0] - start)
        record["decode_seconds_per_token"].append((new[steps - 1] - new[0]) / max(steps - 1, 1))
        record["kept_kv"].append(int(memory_mask.sum()))
    return record


def worker_runs(documents: list[dict], args) -> list[dict]:
    totals = [len(document["context_ids"]) for document in documents]
    runs = [{"label": "full context", "press": None, "mode": "context", "keep": totals}]
    for merge in args.merge_sizes:
        keep = [math.ceil(total / merge) for total in totals]
        for side in ("first", "last"):
            runs.append({"label": f"truncation ({side}), merge {merge}", "press": None, "mode": "context",
                         "truncate": side, "keep": keep, "merge_size": merge})  # fmt: skip
        for name in args.presses:
            press, kwargs = PRESSES[name]
            for mode in args.modes:
                runs.append({"label": f"{name} ({mode}), merge {merge}", "press": press, "press_kwargs": kwargs,
                             "mode": mode, "keep": keep, "merge_size": merge})  # fmt: skip
    return runs


def run_kvpress(documents: list[dict], runs: list[dict], args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="comi-peers-"))
    job = {
        "backbone": str(args.backbone),
        "documents": [
            {key: d[key] for key in ("context", "question", "context_ids", "question_ids")} for d in documents
        ],
        "runs": runs,
        "max_new_tokens": args.max_new_tokens,
        "device": args.device,
        "dtype": args.dtype,
        "threads": 1,
        "check_pipeline": args.check_pipeline,
    }
    (work / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [args.kvpress_python, str(WORKER), str(work / "job.json"), str(work / "results.json")],
        text=True, stderr=sys.stderr, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"the kvpress worker failed (exit {done.returncode}); its messages are above")
    return json.loads((work / "results.json").read_text())


def summarise(record: dict, documents: list[dict], run: dict | None) -> dict:
    entry = {"label": record["label"], "error": record.get("error")}
    if run is not None:
        entry.update({key: run[key] for key in ("press", "mode", "truncate", "merge_size") if run.get(key) is not None})
    if record.get("error"):
        return entry
    scores = [
        best_exact_match(answer, document["answers"])
        for answer, document in zip(record["answers"], documents, strict=True)
    ]
    entry.update(
        exact_match=sum(scores) / len(scores),
        first_token_ms=1000 * statistics.mean(record["first_token_seconds"]),
        decode_ms_per_token=1000 * statistics.mean(record["decode_seconds_per_token"]),
        kept_per_layer=statistics.mean(record["kept_kv"]),
        context_tokens=statistics.mean(len(document["context_ids"]) for document in documents),
        answers=record["answers"],
    )
    if "pipeline_check" in record:
        entry["answers_equal_kvpress_pipeline"] = record["pipeline_check"]
    return entry


def main() -> None:
    args, bench = parse_arguments(__doc__, PeersArguments, BenchArguments)
    if bench.quick:
        args.num_docs, args.words, args.merge_sizes, args.presses, args.check_pipeline = (
            8,
            64,
            [4, 8],
            ["Knorm", "SnapKV"],
            4,
        )
    if args.kvpress_python is None:
        sys.exit("kvpress's environment is missing: make it with `bash .ci/kvpress_venv.sh` (or pass --kvpress_python)")
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    documents = load_documents(args, tokenizer)
    started = time.monotonic()
    model = (
        COMIForConditionalGeneration.from_pretrained(args.comi_model, dtype=getattr(torch, args.dtype))
        .to(args.device)
        .eval()
    )
    comi_tokenizer = AutoTokenizer.from_pretrained(args.comi_model)
    entries = [
        summarise(run_comi(model, comi_tokenizer, documents, merge, args), documents, {"merge_size": merge})
        for merge in args.merge_sizes
    ]
    runs = worker_runs(documents, args)
    peers = run_kvpress(documents, runs, args)
    entries += [summarise(record, documents, run) for record, run in zip(peers["results"], runs, strict=True)]
    results = {
        "command": "python bench/peers.py " + " ".join(sys.argv[1:]),
        "backbone": str(args.backbone),
        "comi_model": str(args.comi_model),
        "documents": len(documents),
        "data": args.data or f"comi-synth test split, {args.words} words",
        "kvpress": peers["meta"],
        "minutes": round((time.monotonic() - started) / 60, 1),
        "entries": entries,
    }
    write_json(bench.json, results)
    table = markdown(entries, args)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if bench.plot:
        plot(entries, args, bench.plot)


def _method(entry: dict) -> str:
    return entry["label"].rsplit(", merge", 1)[0]


def markdown(entries: list[dict], args) -> str:
    methods = list(dict.fromkeys(_method(entry) for entry in entries))
    merges = args.merge_sizes
    lines = [
        "Exact match (greedy), same documents, n/m context tokens kept per decoder layer:",
        "",
        "| method | " + " | ".join(f"merge {m}" for m in merges) + " |",
        "| --- | " + " | ".join("---" for _ in merges) + " |",
    ]
    for method in methods:
        cells = []
        for merge in merges:
            match = [e for e in entries if _method(e) == method and e.get("merge_size", merge) == merge]
            entry = match[0] if match else None
            cells.append("–" if entry is None else ("failed" if entry.get("error") else f"{entry['exact_match']:.3f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    failures = [entry for entry in entries if entry.get("error")]
    if failures:
        lines += ["", "Failed runs: " + "; ".join(f"{e['label']}: {e['error']}" for e in failures)]
    merge = 8 if 8 in merges else merges[0]
    lines += [
        "",
        f"At merge {merge}: time to the first answer token, per further token (ms, one document at a time, one "
        "thread), and what is kept per decoder layer (KV entries, or COMI's memory vectors):",
        "",
        "| method | first token (ms) | per token (ms) | kept per layer |",
        "| --- | --- | --- | --- |",
    ]
    for entry in entries:
        if entry.get("error") or entry.get("merge_size", merge) != merge:
            continue
        lines.append(
            f"| {_method(entry)} | {entry['first_token_ms']:.1f} | {entry['decode_ms_per_token']:.2f} | "
            f"{entry['kept_per_layer']:.1f} of {entry['context_tokens']:.0f} |"
        )
    checks = [
        f"{_method(e)} {e['answers_equal_kvpress_pipeline']}"
        for e in entries
        if e.get("answers_equal_kvpress_pipeline") and e.get("merge_size") == merge
    ]
    if checks:
        lines += ["", f"Answers equal to kvpress's own `pipeline()` (merge {merge}): " + ", ".join(checks)]
    return "\n".join(lines)


def plot(entries: list[dict], args, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(10, 5))
    # One colour per method, dashed with the question compressed too; COMI stands out.
    families = list(dict.fromkeys(_method(entry).split(" (")[0] for entry in entries))
    for method in dict.fromkeys(_method(entry) for entry in entries):
        series = [e for e in entries if _method(e) == method and not e.get("error")]
        if not series:
            continue
        if method == "full context":
            axis.axhline(series[0]["exact_match"], color="black", linestyle=":", label=method)
            continue
        family = method.split(" (")[0]
        style = {"linewidth": 1.2, "alpha": 0.85, "color": f"C{families.index(family) % 10}"}
        if method.startswith("COMI"):
            style = {"linewidth": 2.5, "color": "black"}
        if "with question" in method or method == "truncation (last)":
            style["linestyle"] = "--"
        axis.plot(
            [e["merge_size"] for e in series], [e["exact_match"] for e in series], marker="o", label=method, **style
        )
    axis.set_xscale("log", base=2)
    axis.set_xticks(args.merge_sizes, [f"{m}x" for m in args.merge_sizes])
    axis.set(xlabel="compression (context tokens per kept entry)", ylabel="exact match", ylim=(-0.02, 1.02))
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
