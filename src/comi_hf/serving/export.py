"""`comi-export-decoder`: a COMI model's decoder as a directory that vLLM serves.

    comi-export-decoder MODEL_DIR OUTPUT_DIR

The decoder (LoRA already merged in a saved COMI model), its tokenizer and generation config,
loadable by `vllm serve OUTPUT_DIR` / `python -m vllm.entrypoints.openai.api_server --model
OUTPUT_DIR --enable-prompt-embeds` without any COMI code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["run"]


def run(args: argparse.Namespace) -> None:
    """`comi-export-decoder` with parsed arguments (see `comi_hf_cli.export_parser`); problems are `COMIError`s."""
    from ..errors_comi import UsageError
    from ..loading import first_line, load_comi

    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a directory")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty")
    model, tokenizer = load_comi(args.model)
    try:
        model.export_decoder(output, tokenizer)
    except OSError as error:
        raise UsageError(f"cannot export the decoder to {output}: {first_line(error)}") from error
    architecture = (model.decoder.config.architectures or [type(model.decoder).__name__])[0]
    print(f"exported the decoder of {args.model} ({architecture}) to {output}")
