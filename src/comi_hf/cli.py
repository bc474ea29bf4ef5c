"""`comi-qa`: answer questions about a document from the command line.

    comi-qa --context-file doc.txt --question "..."     # the package's default model
    comi-qa --model PATH_OR_ID --context-file doc.txt --question "..."
    comi-qa --model PATH_OR_ID --context-file - --questions-file questions.txt --json < doc.txt

The arguments are parsed in `comi_hf_cli` (so that `--help` answers without importing torch);
this module reads the inputs, loads the model and answers. Answers (or JSON lines with
`--json`) go to stdout, progress to stderr. Bad input ends with a one-line error and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .loading import UsageError, check_device, load_comi, read_text

__all__ = ["main", "run"]


def _read_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    context = read_text(args.context_file, "context file")
    if not context.strip():
        raise UsageError("the context is empty")
    if args.question is not None:
        questions = [args.question]
    else:
        text = read_text(args.questions_file, "questions file")
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        if not questions:
            raise UsageError(f"no questions in {args.questions_file}")
    if any(not question.strip() for question in questions):
        raise UsageError("the question is empty")
    return context, questions


def _load_pipeline(args: argparse.Namespace):
    from transformers import pipeline

    from .pipeline_comi import DEFAULT_MODEL, PIPELINE_TASK

    device = check_device(args.device)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_comi(args.model or DEFAULT_MODEL, dtype=dtype)
    return pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device=device)


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


def _print_results(args: argparse.Namespace, results: list[dict]) -> None:
    try:
        for result in results:
            if args.json:
                print(json.dumps({key: value for key, value in result.items() if key != "compression"}))
            else:
                print(result["answer"])
        sys.stdout.flush()
    except OSError as error:
        # The interpreter flushes stdout again at exit and would report the same failure with a
        # traceback; point the descriptor at /dev/null so that it has nothing left to fail on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise UsageError(f"cannot write the answers to stdout: {error.strerror or error}") from error


def run(args: argparse.Namespace) -> int:
    """`comi-qa` with parsed arguments (see `comi_hf_cli.qa_parser`); returns the exit status."""
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
        _print_results(args, results)
    except UsageError as error:
        print(f"comi-qa: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from comi_hf_cli import comi_qa

    return comi_qa(argv)


if __name__ == "__main__":
    sys.exit(main())
