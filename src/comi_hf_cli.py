"""The console scripts' front door: argument parsing, then the work in `comi_hf`.

`comi-qa`, `comi-convert`, `comi-synth`, `comi-serve` and `comi-export-decoder` parse their
arguments here, in a module that imports nothing but the standard library, so that `--help` and
argument errors answer at once; importing the `comi_hf` package loads torch and transformers (it
registers the `comi-qa` pipeline task), which takes seconds. Each command then hands its
arguments to the module that does the work. Every problem with the user's input ends with one
`PROG: error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = [
    "comi_convert",
    "comi_export_decoder",
    "comi_qa",
    "comi_serve",
    "comi_synth",
    "convert_parser",
    "export_parser",
    "qa_parser",
    "serve_parser",
    "synth_parser",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def qa_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-qa",
        description="Answer questions about a long document with a COMI model. Answers (or JSON lines with "
        "--json) go to stdout, progress to stderr.",
    )
    parser.add_argument(
        "--model",
        help="COMI model directory or Hub id (default: the tiny model shipped with comi_hf, which answers "
        "questions about comi-synth documents only).",
    )
    parser.add_argument("--context-file", required=True, help="The document, as UTF-8 text; '-' reads stdin.")
    questions = parser.add_mutually_exclusive_group(required=True)
    questions.add_argument("--question", help="One question.")
    questions.add_argument("--questions-file", help="Questions, one a line; the document is encoded once.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per question.")
    parser.add_argument("--explain", metavar="PAGE.html", help="Write an HTML page showing the compression.")
    parser.add_argument("--merge-size", type=int, help="Tokens per memory vector (default: the model's).")
    parser.add_argument("--max-new-tokens", type=int, help="Longest answer, in tokens (default: the model's, 20).")
    parser.add_argument("--batch-size", type=int, default=16, help="Questions answered together (default 16).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="Weights' dtype (default: as saved).")
    return parser


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-convert",
        description="Turn a checkpoint of the official COMI training code (its whole module's state_dict in "
        "one model.safetensors) into a COMI directory.",
    )
    parser.add_argument("checkpoint", help="model.safetensors written by the official training code (or its folder).")
    parser.add_argument("--backbone", required=True, help="The backbone the checkpoint was trained from.")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lora-r", type=int, required=True, help="The training run's LoRA rank.")
    parser.add_argument("--lora-alpha", type=float, required=True, help="The training run's LoRA alpha.")
    parser.add_argument("--merge-size", type=int, default=16)
    parser.add_argument("--segment-size", type=int, default=10000)
    return parser


def synth_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-synth",
        description="Write synthetic long-document QA (the target fact once among near-duplicate facts) in the "
        "official JSONL format.",
    )
    parser.add_argument("--split", choices=("test", "train", "validation"), required=True)
    parser.add_argument("--num-docs", type=int, required=True)
    parser.add_argument("--words", type=int, default=256, help="Document length in words (= tokens), 16 or more.")
    parser.add_argument("--repeats", type=int, default=3, help="Most repetitions of a distractor fact.")
    parser.add_argument("--output", required=True, help="JSONL file to write ('-' for stdout).")
    return parser


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-serve",
        description="Serve COMI over HTTP: POST /v1/answer, GET /health. The compressor runs here; the decoder "
        "runs on a vLLM server that serves the model's exported decoder (comi-export-decoder) with "
        "--enable-prompt-embeds. Keep that vLLM server on loopback or a private network: its prompt-embeddings "
        "endpoint deserialises tensors; expose only comi-serve.",
    )
    parser.add_argument(
        "--model", required=True, help="The COMI model directory or Hub id (its decoder is not loaded)."
    )
    parser.add_argument(
        "--vllm-url",
        required=True,
        action="append",
        help="The vLLM server's base URL, e.g. http://127.0.0.1:8000; repeat it for replicas (each prompt goes to "
        "the least busy one that answers).",
    )
    parser.add_argument("--vllm-model", help="The decoder's name on the vLLM server (default: the one it serves).")
    parser.add_argument("--vllm-api-key", help="The vLLM server's API key, if it was started with one.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (default 8080).")
    parser.add_argument(
        "--api-key", help="Require `Authorization: Bearer KEY` on /v1/answer (default: $COMI_SERVE_API_KEY, if set)."
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=1 << 30,
        help="Memory budget of the encoded-context cache, in bytes (default 1 GiB; 0 turns it off).",
    )
    parser.add_argument(
        "--max-context-tokens", type=int, default=131072, help="Longer contexts are refused (default 131072)."
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=16 << 20, help="Larger request bodies are refused (default 16 MiB)."
    )
    parser.add_argument("--device", default="cpu", help="Where the compressor runs: cpu, cuda, ... (default cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="The compressor's dtype (default: as saved).")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-export-decoder",
        description="Write a COMI model's decoder (LoRA merged) as a causal-LM directory with its tokenizer and "
        "generation config, which vLLM serves unchanged.",
    )
    parser.add_argument("model", help="The COMI model directory or Hub id.")
    parser.add_argument("output_dir", help="The new directory (must not exist, or be empty).")
    return parser


def quiet_deepspeed() -> None:
    """Drop DeepSpeed's import-time notice that it found no GPU.

    accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then writes that notice to
    stdout, where these commands write their answers and JSON lines; they never use DeepSpeed.
    """
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to" not in record.getMessage())


def fail(prog: str, message: str) -> int:
    """Report a problem with the user's input in one line; returns the exit status, 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _too_small(args: argparse.Namespace, minimums: dict[str, int]) -> str | None:
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            return f"--{name.replace('_', '-')} must be at least {minimum}, got {value}"
    return None


def comi_qa(argv: list[str] | None = None) -> int:
    args = qa_parser().parse_args(argv)
    problem = _too_small(args, {"merge_size": 1, "max_new_tokens": 1, "batch_size": 1})
    if problem:
        return fail("comi-qa", problem)
    quiet_deepspeed()
    from comi_hf.cli import run

    return run(args)


def comi_convert(argv: list[str] | None = None) -> int:
    args = convert_parser().parse_args(argv)
    problem = _too_small(args, {"lora_r": 1, "merge_size": 1, "segment_size": 1})
    if problem:
        return fail("comi-convert", problem)
    if not args.lora_alpha > 0:  # also refuses nan
        return fail("comi-convert", f"--lora-alpha must be > 0, got {args.lora_alpha}")
    quiet_deepspeed()
    from comi_hf.convert import run

    return run(args)


def comi_synth(argv: list[str] | None = None) -> int:
    args = synth_parser().parse_args(argv)
    problem = _too_small(args, {"num_docs": 1, "words": 16, "repeats": 1})
    if problem:
        return fail("comi-synth", problem)
    from comi_hf.synthetic import run

    return run(args)


def comi_serve(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    problem = _too_small(args, {"port": 1, "cache_bytes": 0, "max_context_tokens": 1, "max_request_bytes": 1})
    if problem:
        return fail("comi-serve", problem)
    quiet_deepspeed()
    from comi_hf.serving.server import run

    return run(args)


def comi_export_decoder(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    quiet_deepspeed()
    from comi_hf.serving.export import run

    return run(args)
