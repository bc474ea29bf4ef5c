"""`comi-convert`: turn a checkpoint of the official COMI training code into a COMI directory.

    comi-convert model.safetensors --backbone Qwen/Qwen3-4B-Instruct-2507 --output-dir comi-qwen3 \
        --lora-r 128 --lora-alpha 32 [--merge-size 16] [--segment-size 10000]

The official script saves the whole module's `state_dict()` (docs/method.md). Encoder and LSA depths
are read from the keys, the decoder's LoRA is merged with scaling alpha / r (the checkpoint does
not record it: pass the training run's values), and the tokenizer is copied from the backbone.
Every key is either used or dropped for a stated reason; anything else stops the conversion.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors_comi import InvalidInputError, ModelLoadError

__all__ = ["CheckpointMismatch", "check_finite_tensors", "check_lora_scaling", "convert_official_state_dict"]

_LORA = re.compile(r"^decoder\.(.+)\.(lora_A|lora_B)\.default\.weight$")
_BASE_LAYER = re.compile(r"^decoder\.(.+)\.base_layer\.(weight|bias)$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_SCALARS = ("alpha_select", "beta_select", "alpha_merge", "beta_merge")


class CheckpointMismatch(ModelLoadError):
    """The checkpoint is not an official COMI checkpoint for this backbone."""


def check_lora_scaling(lora_r: int, lora_alpha: float) -> float:
    """The LoRA scaling `alpha / r`, if `r >= 1` and the scaling is a positive float32 number."""
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1:
        raise InvalidInputError(f"--lora-r must be an integer >= 1, got {lora_r!r}", field="lora_r")
    scaling = lora_alpha / lora_r if isinstance(lora_alpha, (int, float)) else math.nan
    if not lora_alpha > 0 or not math.isfinite(scaling) or scaling > torch.finfo(torch.float32).max:
        raise InvalidInputError(
            f"--lora-alpha must be a number > 0 whose scaling alpha / r fits float32, got {lora_alpha!r} "
            f"(scaling {scaling:g})",
            field="lora_alpha",
        )
    return scaling


def check_finite_tensors(tensors: dict[str, torch.Tensor], source: object) -> None:
    """Refuse NaN or inf in any floating-point tensor, naming the first one."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointMismatch(
                f"{source}: `{key}` holds {int((~torch.isfinite(tensor)).sum())} NaN or infinite value(s)"
            )


def _depth(keys: list[str], prefix: str) -> int:
    indices = {int(match.group(1)) for key in keys if key.startswith(prefix) for match in [_LAYER_INDEX.search(key)]}
    return max(indices) + 1 if indices else 0


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor], lora_r: int, lora_alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, int], list[tuple[str, str]]]:
    """Map official keys to COMI's.

    Returns the COMI state dict, the alpha/beta scalars, the depths (`encoder_layers`,
    `num_mem_fusion_layers`) and the dropped keys with their reasons.
    """
    check_lora_scaling(lora_r, lora_alpha)
    # Older checkpoints name the encoder `icae`.
    state = {
        ("encoder." + key[len("icae.") :] if key.startswith("icae.") else key): value
        for key, value in state_dict.items()
    }
    keys = sorted(state)
    # The decoder may be a peft model (LoRA) or a plain one (fully fine-tuned).
    state = {re.sub(r"^decoder\.base_model\.model\.", "decoder.", key): value for key, value in state.items()}
    depths = {
        "encoder_layers": _depth(keys, "encoder.model.layers."),
        "num_mem_fusion_layers": _depth(keys, "memory_fusion_layer.model.layers."),
    }
    if depths["encoder_layers"] == 0:
        raise CheckpointMismatch("no `encoder.model.layers.*` (or `icae.*`) keys: not an official COMI checkpoint.")

    converted: dict[str, torch.Tensor] = {}
    scalars: dict[str, float] = {}
    dropped: list[tuple[str, str]] = []
    lora: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in _SCALARS:
            scalars[key] = float(value.float().item())
            if not math.isfinite(scalars[key]):
                raise CheckpointMismatch(f"the checkpoint's `{key}` is {scalars[key]}: MIG needs finite weights")
        elif key == "encoder.lm_head.weight":
            dropped.append((key, "the encoder's LM head is never used (COMI reads its hidden states)"))
        elif key.startswith("encoder.model."):
            converted["encoder." + key[len("encoder.model.") :]] = value
        elif key == "memory_fusion_layer.lm_head.weight":
            dropped.append((key, "the LSA's LM head is never used"))
        elif key == "memory_fusion_layer.model.embed_tokens.weight":
            dropped.append((key, "the LSA reads memory vectors, never token ids"))
        elif key.startswith("memory_fusion_layer.model."):
            converted["lsa." + key[len("memory_fusion_layer.model.") :]] = value
        elif key.startswith("semantic_alignment_layer."):
            reason = (
                "the LSA layers are on, and the official code then skips this Linear"
                if depths["num_mem_fusion_layers"]
                else "the official code skips this Linear when encoder and decoder widths are equal "
                "(one backbone): the memory reaches the decoder unchanged, as COMI's identity-initialised map does"
            )
            dropped.append((key, reason))
        elif match := _LORA.match(key):
            lora.setdefault(match.group(1), {})[match.group(2)] = value
        elif match := _BASE_LAYER.match(key):
            lora.setdefault(match.group(1), {})[f"base_{match.group(2)}"] = value
        elif key.startswith("decoder."):
            converted[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatch(f"keys the official layout does not have: {', '.join(unknown[:10])}")

    converted.update(_merged_lora_weights(lora, lora_r, lora_alpha))
    return converted, scalars, depths, dropped


def _merged_lora_weights(
    lora: dict[str, dict[str, torch.Tensor]], lora_r: int, lora_alpha: float
) -> dict[str, torch.Tensor]:
    """Each LoRA'd decoder module's weight `W + (alpha / r) B A` (and its bias), by COMI key."""
    merged = {}
    scaling = lora_alpha / lora_r
    for module, parts in lora.items():
        if "base_weight" not in parts:
            raise CheckpointMismatch(f"LoRA weights without a base layer for decoder.{module}")
        weight = parts["base_weight"]
        if ("lora_A" in parts) != ("lora_B" in parts):
            raise CheckpointMismatch(f"decoder.{module} has only one of lora_A / lora_B")
        if "lora_A" in parts:
            lora_a, lora_b = parts["lora_A"].float(), parts["lora_B"].float()
            if lora_a.shape[0] != lora_r:
                raise CheckpointMismatch(
                    f"decoder.{module}.lora_A has rank {lora_a.shape[0]}, but --lora-r is {lora_r}"
                )
            weight = (weight.float() + scaling * (lora_b @ lora_a)).to(weight.dtype)
        merged[f"decoder.{module}.weight"] = weight
        if "base_bias" in parts:
            merged[f"decoder.{module}.bias"] = parts["base_bias"]
    return merged


def run(args: argparse.Namespace) -> None:
    """`comi-convert` with parsed arguments (see `comi_hf_cli.convert_parser`); problems are `COMIError`s."""
    from .errors_comi import UsageError
    from .loading import first_line

    try:
        _convert(args)
    except OSError as error:
        raise UsageError(first_line(error)) from error


def _convert(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from .compressor_comi import loading_problems
    from .configuration_comi import COMIConfig
    from .errors_comi import UsageError
    from .loading import check_model_source, first_line
    from .modeling_comi import COMIForConditionalGeneration

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"no such checkpoint: {path}")
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: only safetensors checkpoints are read (pickled files can run code).")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is not a directory")
    check_lora_scaling(args.lora_r, args.lora_alpha)
    backbone_source = check_model_source(args.backbone, "backbone")
    try:
        official = load_file(path)
    except SafetensorError as error:
        raise CheckpointMismatch(f"cannot read {path} (truncated, or not a safetensors file): {error}") from None
    check_finite_tensors(official, path)
    state, scalars, depths, dropped = convert_official_state_dict(official, args.lora_r, args.lora_alpha)
    check_finite_tensors(state, "the merged weights")
    try:
        backbone = AutoConfig.from_pretrained(backbone_source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the backbone's config from {args.backbone}: {first_line(error)}") from None
    for depth, what in (("encoder_layers", "encoder"), ("num_mem_fusion_layers", "LSA block")):
        if depths[depth] > backbone.num_hidden_layers:
            raise CheckpointMismatch(
                f"the checkpoint's {what} has {depths[depth]} layers, more than the {backbone.num_hidden_layers} of "
                f"{args.backbone}: it was trained from another backbone"
            )
    config = COMIConfig(
        text_config=backbone,
        merge_size=args.merge_size,
        segment_size=args.segment_size,
        **depths,
        **scalars,
    )
    dtype = next(iter(state.values())).dtype
    if depths["num_mem_fusion_layers"] == 0:
        # Without LSA layers the official code hands the memory to the decoder unchanged: COMI's
        # LSA map is then the identity.
        hidden_size = backbone.hidden_size
        state["lsa.weight"] = torch.eye(hidden_size, dtype=dtype)
        state["lsa.bias"] = torch.zeros(hidden_size, dtype=dtype)
    model = COMIForConditionalGeneration._from_config(config, dtype=dtype)
    expected = model.state_dict()
    problems = loading_problems(
        set(expected) - set(state),
        set(state) - set(expected),
        [
            f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
            for key in set(state) & set(expected)
            if state[key].shape != expected[key].shape
        ],
    )
    if problems:
        raise CheckpointMismatch(f"the checkpoint does not match {args.backbone}: {problems}")
    model.load_state_dict(state, strict=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone_source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {args.backbone}: {first_line(error)}") from None
    if len(tokenizer) < 2:  # transformers builds an empty one for a backbone without tokenizer files
        raise ModelLoadError(f"{args.backbone} has no tokenizer (its tokenizer has {len(tokenizer)} token(s))")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    adapted = sum(".lora_A." in key for key in official)
    lora = (
        f"LoRA of {adapted} decoder modules merged with scaling {args.lora_alpha / args.lora_r:g}"
        if adapted
        else "no LoRA weights (a fully fine-tuned decoder): --lora-r and --lora-alpha were not needed"
    )
    print(
        f"converted {path} -> {output_dir}: encoder {depths['encoder_layers']} layers, "
        f"LSA {depths['num_mem_fusion_layers']} layers, {lora}"
    )
    for key, reason in dropped:
        print(f"  dropped {key}: {reason}")
