"""Many concurrent questions about long documents: COMI on vLLM against vLLM with the full context.

A load of Q questions over D documents (each question its own request, all arriving at once)
is answered three ways by the same random model, whose backbone is shaped like Qwen3-4B in depth
and vocabulary but tiny in width (`common.qwen3_shaped_model`, head_dim 32):

* (a) `pipeline("comi-qa")` in this process: each document's questions in one call (the
  document encoded once), documents one after another;
* (b) `comi-serve` + vLLM: the requests to `comi-serve` (a subprocess), which compresses the
  requests that arrive together in one pass (and keeps encoded documents in its cache) and has
  vLLM decode from prompt embeddings;
* (c) vLLM alone with the full context as plain tokens (`[document ; question]`), prefix caching
  on as users run it (a document's KV cache serves its next questions).

All three use greedy decoding, a fixed number of new tokens and the official repetition penalty
1.3. Reported, within one run: answers per second, p50/p95 latency (from the load's start to each
answer) and the peak memory (RSS) of each process during each phase, and how many of (b)'s
answers equal (a)'s token for token.

    python bench/serving.py                        # 2K and 8K tokens, 64 questions over 16 documents, merge 8 and 32
    python bench/serving.py --quick                # a smoke test of the script (tiny sizes): not a measurement
    python bench/serving.py --device cuda          # the compressor on a GPU (with vLLM's CUDA build)

vLLM runs from its own environment ($COMI_VLLM_VENV, made by `bash .ci/vllm_venv.sh`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from common import (
    BackboneArguments,
    BenchArguments,
    machine_description,
    parse_arguments,
    pyplot,
    write_json,
)
from server_processes import ServerProcess, VLLMServer, find_vllm_python, free_port
from transformers import pipeline

from comi_hf.data import word_level_tokenizer


@dataclass
class ServingArguments:
    context_tokens: list[int] = field(
        default_factory=lambda: [2048, 8192], metadata={"help": "Document lengths in tokens."}
    )
    merge_sizes: list[int] = field(default_factory=lambda: [8, 32], metadata={"help": "COMI's merge sizes."})
    documents: int = field(default=16, metadata={"help": "Documents in the load (D)."})
    questions_per_document: int = field(default=4, metadata={"help": "Questions about each document (Q = D x this)."})
    new_tokens: int = field(default=16, metadata={"help": "Tokens generated per answer (EOS off)."})
    device: str = field(default="cpu", metadata={"help": "Where the compressor runs (vLLM picks its own device)."})
    vllm_kv_cache_gib: int = field(default=6, metadata={"help": "vLLM's KV cache on a CPU build (GiB)."})
    vllm_python: str | None = field(
        default_factory=find_vllm_python, metadata={"help": "The Python of vLLM's environment."}
    )
    markdown: str | None = field(default=None, metadata={"help": "Write the table here (Markdown)."})


class PeakRSS:
    """The peak resident memory of a process (and its children, with `children`), sampled every 50 ms."""

    def __init__(self, pid: int, children: bool = True):
        self.pid, self.children, self.peak, self._running = pid, children, 0, False

    def _tree(self, pid: int) -> list[int]:
        if not self.children:
            return [pid]
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid, *(grandchild for child in children for grandchild in self._tree(int(child)))]

    def rss(self) -> int:
        total = 0
        for pid in self._tree(self.pid):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS")), 0)
        return total

    def __enter__(self):
        self.peak, self._running = self.rss(), True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()


async def burst(url: str, bodies: list[dict]) -> tuple[list, list[float], float]:
    """POST every request at once (each its own connection); results, latencies from the start, makespan."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()

        async def one(body):
            response = await client.post(url, json=body)
            response.raise_for_status()
            return response.json(), time.perf_counter() - start

        done = await asyncio.gather(*(one(body) for body in bodies))
    return [result for result, _ in done], [latency for _, latency in done], time.perf_counter() - start


def summary(method: str, latencies: list[float], makespan: float, memory: dict) -> dict:
    ordered = sorted(latencies)
    return {
        "method": method,
        "answers_per_second": len(latencies) / makespan,
        "seconds": makespan,
        "p50_latency_seconds": statistics.median(ordered),
        "p95_latency_seconds": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "peak_rss_bytes": memory,
    }


def run_pipeline(pipe, documents, questions, args) -> tuple[list[list[int]], dict]:
    """(a): each document's questions in one `pipeline` call, documents in turn."""
    start = time.perf_counter()
    answers, latencies = [], []
    # This process alone: the vLLM server and comi-serve are its children.
    with PeakRSS(os.getpid(), children=False) as memory:
        for document, asked in zip(documents, questions, strict=True):
            result = pipe(context=document, questions=asked, max_new_tokens=args.new_tokens, merge_size=args.merge)
            answers += result["answers"]
            latencies += [time.perf_counter() - start] * len(asked)
    row = summary(f"(a) pipeline, merge {args.merge}", latencies, time.perf_counter() - start, {"bench": memory.peak})
    return answers, row


def run_comi_serve(url: str, server_pid: int, vllm_pid: int, documents, questions, args) -> tuple[list, dict]:
    """(b): every question its own request to comi-serve, all at once."""
    bodies = [
        {"context": document, "question": question, "merge_size": args.merge, "max_new_tokens": args.new_tokens}
        for document, asked in zip(documents, questions, strict=True)
        for question in asked
    ]
    with PeakRSS(server_pid) as served, PeakRSS(vllm_pid) as decoder:
        results, latencies, makespan = asyncio.run(burst(url + "/v1/answer", bodies))
    memory = {"comi-serve": served.peak, "vLLM": decoder.peak}
    return [result["answer"] for result in results], summary(
        f"(b) comi-serve + vLLM, merge {args.merge}", latencies, makespan, memory
    )


def run_full_context(vllm: VLLMServer, model_name: str, tokenizer, documents, questions, args) -> dict:
    """(c): vLLM with `[document ; question]` as token ids, every question its own request."""
    bodies = [
        {
            "model": model_name,
            "prompt": tokenizer(document + " " + question, add_special_tokens=False)["input_ids"],
            "max_tokens": args.new_tokens,
            "temperature": 0.0,
            "repetition_penalty": 1.3,
            "ignore_eos": True,
        }
        for document, asked in zip(documents, questions, strict=True)
        for question in asked
    ]
    with PeakRSS(vllm.process.pid) as decoder:
        _, latencies, makespan = asyncio.run(burst(vllm.url + "/v1/completions", bodies))
    return summary("(c) vLLM, full context", latencies, makespan, {"vLLM": decoder.peak})


def start_comi_serve(model_dir: Path, vllm_url: str, args, log: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    command = [shutil.which("comi-serve"), "--model", str(model_dir), "--vllm-url", vllm_url, "--port", str(port)]
    command += ["--device", args.device, "--max-context-tokens", str(2 * max(args.context_tokens))]
    command += ["--log-level", "warning"]
    with log.open("w") as output:  # the server keeps its own copy of the descriptor
        process = ServerProcess(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.stop()
                raise RuntimeError(f"comi-serve did not start; see {log}") from None
            time.sleep(0.5)


def main() -> None:
    args, backbone_args, bench = parse_arguments(__doc__, ServingArguments, BackboneArguments, BenchArguments)
    if bench.quick:
        backbone_args.use_quick_sizes()
        args.context_tokens, args.merge_sizes, args.documents, args.questions_per_document = [256], [8], 2, 2
        args.new_tokens, args.vllm_kv_cache_gib = 4, 1
    if args.vllm_python is None:
        sys.exit("vLLM's environment is missing: make it with `bash .ci/vllm_venv.sh` (or pass --vllm_python)")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="comi-serving-bench-"))
    longest = max(args.context_tokens) + 64 + args.new_tokens
    model = backbone_args.model(max_positions=longest + 64, merge_size=min(args.merge_sizes))
    model.generation_config.eos_token_id = None  # every method generates exactly --new_tokens tokens
    words = [f"w{i}" for i in range(min(2000, backbone_args.vocab_size - 3))]  # ids 0-2: pad, EOS, unknown
    tokenizer = word_level_tokenizer(words)
    model.save_pretrained(work / "comi")
    tokenizer.save_pretrained(work / "comi")
    model.export_decoder(work / "decoder", tokenizer)
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer, device=args.device)
    generator = torch.Generator().manual_seed(0)

    def text(length: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (length,), generator=generator))

    backbone = backbone_args.description()
    print(f"{backbone}; compressor on {machine_description(args.device)}; vLLM {args.vllm_python}")
    rows = []
    vllm = VLLMServer(
        args.vllm_python, work / "decoder", max_model_len=longest + 64, log=work / "vllm.log",
        env={"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)},
    )  # fmt: skip
    with vllm:
        name = str(work / "decoder")
        for length in args.context_tokens:
            documents = [text(length) for _ in range(args.documents)]
            questions = [[text(12) for _ in range(args.questions_per_document)] for _ in documents]
            total = args.documents * args.questions_per_document
            print(f"\n{total} questions over {args.documents} documents of {length} tokens", flush=True)
            full = run_full_context(vllm, name, tokenizer, documents, questions, args)
            full.update(context_tokens=length)
            rows.append(full)
            print(_line(full), flush=True)
            for merge in args.merge_sizes:
                args.merge = merge
                answers_a, pipeline_row = run_pipeline(pipe, documents, questions, args)
                # A fresh comi-serve each time: its cache starts empty, as for new documents.
                server, url = start_comi_serve(work / "comi", vllm.url, args, work / "comi-serve.log")
                try:
                    answers_b, served_row = run_comi_serve(
                        url, server.pid, vllm.process.pid, documents, questions, args
                    )
                    health = httpx.get(url + "/health", timeout=30).json()
                    served_row["comi_serve_cache"] = health["cache"]
                finally:
                    server.stop()
                same = sum(a == b for a, b in zip(answers_a, answers_b, strict=True))
                for row in (pipeline_row, served_row):
                    row.update(context_tokens=length, merge_size=merge)
                served_row["answers_equal_pipeline"] = f"{same}/{total}"
                served_row["speedup_over_full_context"] = served_row["answers_per_second"] / full["answers_per_second"]
                served_row["speedup_over_pipeline"] = (
                    served_row["answers_per_second"] / pipeline_row["answers_per_second"]
                )
                rows += [pipeline_row, served_row]
                print(_line(pipeline_row), flush=True)
                print(_line(served_row), flush=True)
    results = {
        "quick": bench.quick,
        "backbone": backbone,
        "machine": machine_description(args.device),
        "documents": args.documents,
        "questions_per_document": args.questions_per_document,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    write_json(bench.json, results)
    table = markdown(rows)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if bench.plot:
        plot(rows, bench.plot)
    shutil.rmtree(work, ignore_errors=True)


def _line(row: dict) -> str:
    memory = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in row["peak_rss_bytes"].items())
    extra = ""
    if "speedup_over_full_context" in row:
        extra = (
            f" | {row['speedup_over_full_context']:.2f}x full context, {row['speedup_over_pipeline']:.2f}x pipeline; "
            f"answers equal (a): {row['answers_equal_pipeline']}"
        )
    return (
        f"  {row['method']:<32} {row['answers_per_second']:8.2f} answers/s  p50 {row['p50_latency_seconds']:7.2f} s  "
        f"p95 {row['p95_latency_seconds']:7.2f} s  peak {memory}{extra}"
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| context tokens | method | answers/s | p50 latency (s) | p95 latency (s) | peak RSS (GiB) "
        "| vs full context |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        memory = ", ".join(f"{name} {value / 2**30:.2f}" for name, value in row["peak_rss_bytes"].items())
        versus = f"{row['speedup_over_full_context']:.2f}x" if "speedup_over_full_context" in row else ""
        lines.append(
            f"| {row['context_tokens']} | {row['method']} | {row['answers_per_second']:.2f} | "
            f"{row['p50_latency_seconds']:.2f} | {row['p95_latency_seconds']:.2f} | {memory} | {versus} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    lengths = sorted({row["context_tokens"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        series = {row["context_tokens"]: row for row in rows if row["method"] == method}
        xs = [position + index * width for position, length in enumerate(lengths) if length in series]
        left.bar(
            xs, [series[length]["answers_per_second"] for length in lengths if length in series], width, label=method
        )
        right.bar(
            xs, [series[length]["p95_latency_seconds"] for length in lengths if length in series], width, label=method
        )
    for axis, label in ((left, "answers per second"), (right, "p95 latency (s)")):
        axis.set_xticks(
            [position + 0.4 - width / 2 for position in range(len(lengths))], [f"{n} tokens" for n in lengths]
        )
        axis.set_ylabel(label)
        axis.set_yscale("log")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
