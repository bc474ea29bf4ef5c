"""Building COMI from a decoder-only backbone checkpoint (Qwen2, Qwen3, Llama, Mistral, ...).

The backbone's weights fill the decoder; the encoder (its first `encoder_layers` layers, its
embeddings and final norm) and the LSA block (its first `num_mem_fusion_layers` layers and final
norm) start as copies of them (comi_hf's docs/method.md, "The model").
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import AutoConfig

from .compressor_comi import NOT_IN_BACKBONE, COMIPreTrainedModel
from .configuration_comi import COMIConfig
from .errors_comi import ModelLoadError

__all__ = ["copy_backbone_into_encoder_and_lsa", "load_backbone"]


def load_backbone(
    cls: type[COMIPreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    hub: dict,
    loading: dict,
    config_overrides: dict,
) -> COMIPreTrainedModel:
    """A `cls` model whose decoder holds the backbone's weights (encoder and LSA not yet copied).

    Args:
        hub: Hub options (`revision`, `token`, `cache_dir`, `local_files_only`, `trust_remote_code`).
        loading: `from_pretrained` options (`dtype`, `device_map`, `attn_implementation`).
        config_overrides: [`COMIConfig`] fields.
    """
    backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    if getattr(backbone_config, "model_type", None) == COMIConfig.model_type:
        raise ModelLoadError(
            f"{pretrained_model_name_or_path} is already a COMI model: load it with "
            "`COMIForConditionalGeneration.from_pretrained`."
        )
    config = COMIConfig(text_config=backbone_config, **config_overrides)
    # The checkpoint's `model.*` / `lm_head.*` weights load into `decoder.*` (COMI's
    # `base_model_prefix`); the encoder, LSA and MIG weights are new.
    model, _ = cls.load_checked(
        pretrained_model_name_or_path,
        config=config,
        expected_missing=NOT_IN_BACKBONE,
        what="a backbone matching its own config",
        ignore_mismatched_sizes=True,
        **loading,
        **hub,
    )
    # The alpha/beta weights are new, and transformers applies `_keep_in_fp32_modules_strict`
    # only to weights found in the checkpoint.
    model.compressor.float()
    return model


@torch.no_grad()
def copy_backbone_into_encoder_and_lsa(model: COMIPreTrainedModel) -> None:
    """(Re)initialise `model`'s encoder and LSA block from its decoder's weights."""
    source = dict(model.decoder.get_decoder().state_dict(keep_vars=True))
    targets = [model.encoder] + ([model.lsa] if model.config.num_mem_fusion_layers > 0 else [])
    for target in targets:
        for name, tensor in target.state_dict(keep_vars=True).items():
            if name not in source:
                raise ModelLoadError(f"The backbone has no `{name}` to initialise the {type(target).__name__} from.")
            # Under DeepSpeed ZeRO-3 (`zero.Init`, which `from_pretrained` enters whenever a ZeRO-3
            # config is active) each process holds an empty shard: gather the pair, copy, and let
            # rank 0's copy be re-partitioned. Gathered one pair at a time, never the whole model.
            with _gathered([source[name], tensor]):
                if source[name].is_meta or tensor.is_meta:
                    raise ModelLoadError(
                        "Cannot copy the backbone into the encoder while weights are offloaded (meta device); "
                        "load without CPU/disk offload, save, then use `from_pretrained`."
                    )
                tensor.data.copy_(source[name].data.to(device=tensor.device, dtype=tensor.dtype))


def _gathered(tensors: list[torch.Tensor]):
    """DeepSpeed ZeRO-3's `GatheredParameters` over `tensors` where any is a partitioned parameter
    (changes made on rank 0 are kept), else a no-op context."""
    partitioned = [tensor for tensor in tensors if hasattr(tensor, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    # Inside `try`, which transformers' check of remote code skips: loading this model with
    # `trust_remote_code` must not require DeepSpeed, whose parameters only exist under it anyway.
    try:
        import deepspeed
    except ImportError as error:
        raise ModelLoadError(
            "These weights are partitioned by DeepSpeed ZeRO-3, but deepspeed fails to import."
        ) from error

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
