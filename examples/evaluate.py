"""Evaluate a COMI model on a JSONL test file: exact match and token F1 (SQuAD-normalised).

    python examples/evaluate.py --model_name_or_path comi-model --test_file test.jsonl \
        --output_dir eval --merge_size 16 --per_device_eval_batch_size 8
    accelerate launch examples/evaluate.py ...   # shards the file across processes

Writes `eval_results.jsonl` (id, context, question, prediction, references, per-sample scores)
in input order and `eval_metrics.json` (exact_match, f1, num_samples, merge_size,
compression_ratio). Generation uses the model's settings (the official evaluation's by default:
greedy, 20 new tokens, repetition penalty 1.3) unless `--max_new_tokens` is given.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, HfArgumentParser

from comi_hf import COMIForConditionalGeneration
from comi_hf.data import load_comi_jsonl
from comi_hf.evaluation import answer_dataset, summarize, write_metrics
from comi_hf.loading import parse_script_arguments

logger = logging.getLogger("comi_hf.evaluate")


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "A COMI model directory or Hub id."})
    test_file: str = field(metadata={"help": "JSONL with input, prompt, answer."})
    output_dir: str = field(metadata={"help": "Where eval_results.jsonl and eval_metrics.json go."})
    merge_size: int | None = field(default=None, metadata={"help": "Compression ratio (default: the model's)."})
    per_device_eval_batch_size: int = field(default=8)
    num_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N samples only."})
    max_context_tokens: int | None = field(default=None, metadata={"help": "Truncate contexts (first/last halves)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Longest answer (default: the model's, 20)."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})


def fail(message: str) -> None:
    """End the run with one line naming the problem."""
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_arguments(args: EvaluationArguments) -> None:
    for name in ("merge_size", "per_device_eval_batch_size", "num_samples", "max_context_tokens", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be at least 1, got {value}")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype}")


def main(argv: list[str] | None = None) -> dict | None:
    (args,) = parse_script_arguments(HfArgumentParser(EvaluationArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_arguments(args)
    try:
        dataset = load_comi_jsonl(args.test_file)
    except (OSError, ValueError) as error:
        fail(str(error))
    # On a machine without GPUs, processes started by `accelerate launch` share the work over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = COMIForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=dtype).to(state.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    merge_size = model.config.merge_size if args.merge_size is None else args.merge_size
    options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}

    # Each process answers a contiguous share; shares are gathered back in input order.
    positions = list(range(len(dataset)))
    with state.split_between_processes(positions) as share:
        records = answer_dataset(
            model,
            tokenizer,
            dataset.select(share),
            batch_size=args.per_device_eval_batch_size,
            merge_size=merge_size,
            max_context_tokens=args.max_context_tokens,
            progress=state.is_local_main_process,
            **options,
        )
        for position, record in zip(share, records, strict=True):
            record["position"] = position
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    # The gather was the last collective: every process leaves the process group now. A process
    # that exits with it still open can abort in gloo's teardown (SIGABRT, "terminate called
    # without an active exception") while the main process is still writing the results.
    state.destroy_process_group()
    if not state.is_main_process:
        return None
    records.sort(key=lambda record: record.pop("position"))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "eval_results.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = summarize(records, merge_size)
    write_metrics(output_dir / "eval_metrics.json", metrics)
    logger.info("metrics: %s", metrics)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
