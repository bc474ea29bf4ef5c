"""Write a tiny random decoder-only backbone and its tokenizer, for trying the examples offline.

    python examples/make_tiny_backbone.py tiny-backbone [--hidden_size 128]

A word-level tokenizer over the words of `examples/data/*.jsonl` and a 4-layer Llama with 4
attention heads, hidden size 64 by default (head dim 16; vLLM's CPU backend needs a head dim of
32 or more: `--hidden_size 128`). Random weights: COMI fine-tuning on the example data shows the
loss falling, not a useful model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from comi_hf.data import word_level_tokenizer
from comi_hf.loading import parse_script_arguments

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class TinyBackboneArguments:
    hidden_size: int = field(default=64, metadata={"help": "A multiple of 4 (the heads)."})


def main(output_dir: str, hidden_size: int = 64) -> None:
    words = set()
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
            for text in (record["input"], record["prompt"], *answers):
                words.update(text.split())
    tokenizer = word_level_tokenizer(sorted(words))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    print(f"wrote a {len(tokenizer)}-word tiny Llama backbone to {output_dir}")


if __name__ == "__main__":
    parser = HfArgumentParser(TinyBackboneArguments, description=__doc__.split("\n\n")[0])
    # Positional, as every command line in the README, docs and tests gives it.
    parser.add_argument("output_dir", help="Where the backbone and its tokenizer go.")
    args, positional = parse_script_arguments(parser)
    if args.hidden_size < 4 or args.hidden_size % 4:
        parser.error(f"--hidden_size must be a positive multiple of 4, got {args.hidden_size}")
    main(positional.output_dir, args.hidden_size)
