"""`comi-qa`: answer questions about a document from the command line.

    comi-qa --context-file doc.txt --question "..."     # the package's default model
    comi-qa --model PATH_OR_ID --context-file doc.txt --question "..."
    comi-qa --model PATH_OR_ID --context-file - --questions-file questions.txt --json < doc.txt

Answers (or JSON lines with `--json`) go to stdout, progress to stderr. Bad input ends with a
one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """A problem with the user's input, reported in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comi-qa", description="Answer questions about a long document with a COMI model."
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
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="Weights' dtype (default: as saved).")
    return parser


def _read_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.context_file == "-":
        context = sys.stdin.read()
    else:
        path = Path(args.context_file)
        if not path.is_file():
            raise UsageError(f"no such context file: {path}")
        context = path.read_text(encoding="utf-8")
    if not context.strip():
        raise UsageError("the context is empty")
    if args.question is not None:
        questions = [args.question]
    else:
        path = Path(args.questions_file)
        if not path.is_file():
            raise UsageError(f"no such questions file: {path}")
        questions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not questions:
            raise UsageError(f"no questions in {path}")
    if any(not question.strip() for question in questions):
        raise UsageError("the question is empty")
    for name in ("merge_size", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return context, questions


def _load_pipeline(args: argparse.Namespace):
    import torch
    from transformers import AutoTokenizer, pipeline

    from .modeling_comi import COMIForConditionalGeneration
    from .pipeline_comi import DEFAULT_MODEL, PIPELINE_TASK

    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.model.startswith(("/", "./", "../", "~")) and not Path(args.model).expanduser().is_dir():
        raise UsageError(f"no such model directory: {args.model}")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {args.device!r}") from error
    try:
        model = COMIForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a COMI model from {args.model}: {_first_line(error)}") from error
    return pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device=device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _answer(args: argparse.Namespace, pipe, context: str, questions: list[str]) -> list[dict]:
    from tqdm.auto import tqdm

    options = {"return_compression": bool(args.explain)}
    if args.merge_size is not None:
        options["merge_size"] = args.merge_size
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    results = []
    chunks = [questions[start : start + args.batch_size] for start in range(0, len(questions), args.batch_size)]
    # A bar only when there is more than one batch of questions to wait for.
    bar = tqdm(total=len(questions), desc="Answering", unit="question", file=sys.stderr, disable=len(chunks) <= 1)
    with bar as progress:
        for chunk in chunks:
            output = pipe(context=context, questions=chunk, **options)
            for position, question in enumerate(chunk):
                result = {
                    "question": question,
                    "answer": output["answers"][position],
                    "context_tokens": output["context_tokens"],
                    "memory_tokens": output["memory_tokens"][position],
                    "compression_ratio": output["compression_ratio"][position],
                }
                if args.explain:
                    result["compression"] = output["compressions"][position]
                results.append(result)
            progress.update(len(chunk))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        context, questions = _read_inputs(args)
        pipe = _load_pipeline(args)
        results = _answer(args, pipe, context, questions)
        if args.explain:
            from .explain import render_compression_html

            page = render_compression_html(
                [result["compression"] for result in results],
                questions=questions,
                answers=[result["answer"] for result in results],
                merge_size=args.merge_size or pipe.model.config.merge_size,
            )
            try:
                Path(args.explain).write_text(page, encoding="utf-8")
            except OSError as error:
                raise UsageError(f"cannot write {args.explain}: {error.strerror}") from error
    except UsageError as error:
        print(f"comi-qa: error: {error}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps({key: value for key, value in result.items() if key != "compression"}))
        else:
            print(result["answer"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
