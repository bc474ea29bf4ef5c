"""Helpers shared by the benchmark scripts (not a benchmark itself): the options they share and
their parsing, timing, the benchmark backbone, and the JSON / plot output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import HfArgumentParser, Qwen3Config
from transformers.generation.streamers import BaseStreamer

from comi_hf import COMIConfig, COMIForConditionalGeneration
from comi_hf.loading import parse_script_arguments

# The `--dtype` of the scripts that take one.
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class BenchArguments:
    """The options every benchmark script takes."""

    quick: bool = field(default=False, metadata={"help": "Tiny sizes: a smoke test of the script, not a measurement."})
    json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})
    plot: str | None = field(default=None, metadata={"help": "Write a PNG plot here (needs matplotlib)."})


@dataclass
class BackboneArguments:
    """The shape of `qwen3_shaped_model`'s backbone, for the scripts that time a random model."""

    layers: int = field(default=36, metadata={"help": "Backbone layers (Qwen3-4B: 36)."})
    encoder_layers: int = field(default=8, metadata={"help": "Backbone layers in COMI's encoder."})
    hidden_size: int = field(default=128, metadata={"help": "Hidden size (tiny, so that it runs on a CPU)."})
    vocab_size: int = field(default=151936, metadata={"help": "Vocabulary size (Qwen3's: 151,936)."})

    def use_quick_sizes(self) -> None:
        """`--quick`: a 4-layer backbone (encoder 2) with a 1,000-token vocabulary."""
        self.layers, self.encoder_layers, self.vocab_size = 4, 2, 1000

    def model(self, *, max_positions: int, merge_size: int = 16, **kwargs) -> COMIForConditionalGeneration:
        """The random COMI model of this shape (`qwen3_shaped_model`)."""
        return qwen3_shaped_model(
            layers=self.layers,
            encoder_layers=self.encoder_layers,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            max_positions=max_positions,
            merge_size=merge_size,
            **kwargs,
        )

    def description(self) -> str:
        return (
            f"Qwen3-shaped: {self.layers} layers (encoder {self.encoder_layers}, LSA 1), hidden {self.hidden_size}, "
            f"vocabulary {self.vocab_size}"
        )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help`: the script's docstring as it is written, then every option with its default."""


def parse_arguments(description: str, *dataclass_types: type) -> tuple:
    """The command line parsed into an instance of each of `dataclass_types`, in their order; with
    `--quick`, a first line says that what follows is no measurement."""
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter)
    parsed = parse_script_arguments(parser)
    if any(isinstance(arguments, BenchArguments) and arguments.quick for arguments in parsed):
        print("--quick: tiny sizes, a smoke test of this script; its figures are not measurements")
    return parsed


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(function: Callable[[], object], repeats: int, device: str | torch.device = "cpu") -> float:
    """Run once to warm up, then return the median wall time of `repeats` runs."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TokenClock(BaseStreamer):
    """A `generate` streamer that stamps the time of every `put` (each new token as it is chosen)."""

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def qwen3_shaped_model(
    *,
    layers: int = 36,
    encoder_layers: int = 8,
    hidden_size: int = 128,
    vocab_size: int = 151936,
    max_positions: int = 32768,
    merge_size: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> COMIForConditionalGeneration:
    """A random COMI model whose backbone is shaped like Qwen3-4B in depth (36 layers, encoder 8,
    LSA 1) and vocabulary (151,936), but tiny in width, so that it runs on a CPU. The cost that
    COMI saves (decoder layers over the context) and the cost it keeps (the vocabulary
    projection per generated token) keep their real proportions along the depth."""
    backbone = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    config = COMIConfig(text_config=backbone, encoder_layers=encoder_layers, merge_size=merge_size)
    return COMIForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def machine_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    return plt
