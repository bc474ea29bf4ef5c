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

from .errors_comi import UsageError
from .loading import check_device, load_comi, read_text
from .processing_comi import COMIInput, check_decoder_positions, check_merge_size, check_text, prepare_inputs

__all__ = ["run"]


def _read_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    context = read_text(args.context_file, "context file")
    if args.question is not None:
        questions = [check_text(args.question, "question")]
    else:
        text = read_text(args.questions_file, "questions file")
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        if not questions:
            raise UsageError(f"no questions in {args.questions_file}")
    return context, questions


def _load_pipeline(args: argparse.Namespace):
    from transformers import pipeline

    from .pipeline_comi import DEFAULT_MODEL, PIPELINE_TASK

    device = check_device(args.device)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_comi(DEFAULT_MODEL if args.model is None else args.model, dtype=dtype)
    return pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device=device)


def _prepare(args: argparse.Namespace, pipe, context: str, questions: list[str]) -> COMIInput:
    """The inputs checked and tokenised once, and refused before any encoding when the decoder
    would read past its positions."""
    model = pipe.model
    vocab_size = model.get_input_embeddings().num_embeddings
    (prepared,) = prepare_inputs({"context": context, "questions": questions}, pipe.tokenizer, vocab_size)
    merge_size = model.config.merge_size if args.merge_size is None else check_merge_size(args.merge_size)
    new_tokens = args.max_new_tokens or model.generation_config.max_new_tokens or 0
    longest_question = max(len(ids) for ids in prepared.question_ids)
    check_decoder_positions(model.config, len(prepared.context_ids), longest_question, merge_size, new_tokens)
    return prepared


def _answer(args: argparse.Namespace, pipe, prepared: COMIInput, questions: list[str]) -> list[dict]:
    from tqdm.auto import tqdm

    options = {"return_compression": bool(args.explain), "show_progress": True}
    if args.merge_size is not None:
        options["merge_size"] = args.merge_size
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    results = []
    starts = range(0, len(questions), args.batch_size)
    # A bar only when there is more than one batch of questions to wait for.
    bar = tqdm(total=len(questions), desc="Answering", unit="question", file=sys.stderr, disable=len(starts) <= 1)
    with bar as progress:
        for start in starts:
            chunk = prepared.question_ids[start : start + args.batch_size]
            output = pipe(context=prepared.context_ids, questions=chunk, **options)
            for position, question in enumerate(questions[start : start + args.batch_size]):
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


def run(args: argparse.Namespace) -> None:
    """`comi-qa` with parsed arguments (see `comi_hf_cli.qa_parser`); problems are `COMIError`s."""
    context, questions = _read_inputs(args)
    pipe = _load_pipeline(args)
    prepared = _prepare(args, pipe, context, questions)
    results = _answer(args, pipe, prepared, questions)
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
