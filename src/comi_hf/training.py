"""The official training recipe on a COMI model: which parts train, fully or with LoRA (peft).

The official recipe (docs/method.md): encoder and LSA fully trained, decoder frozen except LoRA
on its attention projections (r 128, alpha 32, dropout 0.05). Every part can instead be frozen,
trained fully or given LoRA.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from .errors_comi import InvalidInputError
from .modeling_comi import COMIForConditionalGeneration

__all__ = [
    "PART_MODES",
    "finalize_trained_model",
    "lora_target_pattern",
    "prepare_for_training",
    "weights_without_gradient",
]

PART_MODES = ("full", "lora", "freeze")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Where each part's transformer layers live inside COMI.
_LAYER_PREFIX = {"encoder": r"encoder", "lsa": r"lsa", "decoder": r"decoder\.model"}


def weights_without_gradient(config) -> list[str]:
    """The learnable MIG weights that no gradient reaches under `config`'s switches (data-parallel
    training must then look for unused parameters): `beta_merge` without the fine redundancy
    term, both without the fine stage."""
    if not config.learnable_merge_weights or (config.fine_grained and config.fine_redundancy):
        return []
    return ["beta_merge"] if config.fine_grained else ["alpha_merge", "beta_merge"]


def lora_target_pattern(parts: Sequence[str], target_modules: Sequence[str] = DEFAULT_LORA_TARGETS) -> str:
    """A peft `target_modules` regex selecting `target_modules` in the layers of `parts` only."""
    prefixes = "|".join(_LAYER_PREFIX[part] for part in parts)
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"({prefixes})\.layers\.\d+\.(.*\.)?({names})"


def prepare_for_training(
    model: COMIForConditionalGeneration,
    *,
    encoder: str = "full",
    lsa: str = "full",
    decoder: str = "lora",
    lora_r: int = 128,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> nn.Module:
    """Set which parameters train. Returns the model, wrapped in a `peft.PeftModel` if any part uses LoRA.

    Args:
        model: a COMI model.
        encoder, lsa, decoder: `"full"`, `"lora"` or `"freeze"` for each part.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapters' settings.

    Learnable alpha/beta weights (see `COMIConfig`) always train. With LoRA, fully trained parts
    are peft `modules_to_save`, so checkpoints hold them and resuming restores them.
    """
    modes = {"encoder": encoder, "lsa": lsa, "decoder": decoder}
    for part, mode in modes.items():
        if mode not in PART_MODES:
            raise InvalidInputError(f"`{part}` must be one of {PART_MODES}, got {mode!r}.")
    if isinstance(model.lsa, nn.Linear) and lsa == "lora":
        raise InvalidInputError(
            "LoRA on the LSA needs LSA layers (`num_mem_fusion_layers` > 0); use 'full' or 'freeze'."
        )
    full_parts = [part for part, mode in modes.items() if mode == "full"]
    lora_parts = [part for part, mode in modes.items() if mode == "lora"]
    learnable_weights = any(True for _ in model.compressor.parameters())

    if not lora_parts:
        for part, mode in modes.items():
            getattr(model, part).requires_grad_(mode == "full")
        model.compressor.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias="none",
        target_modules=lora_target_pattern(lora_parts, lora_target_modules),
        modules_to_save=full_parts + (["compressor"] if learnable_weights else []) or None,
    )
    # peft refuses a pattern that matches no module ("No modules were targeted for adaptation").
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: its warning is
        # about peft's code, not the user's, and would show once in every training process.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


def finalize_trained_model(model: nn.Module) -> COMIForConditionalGeneration:
    """The plain COMI model after training: LoRA merged into its weights (`W + alpha/r * B A`)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
