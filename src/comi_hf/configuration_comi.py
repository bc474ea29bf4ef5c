"""COMI model configuration."""

from __future__ import annotations

import copy
import math

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["COMIConfig"]


@as_validated_field
def finite(value: float) -> None:
    """A MIG weight: a NaN or infinite one makes every score NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Value must be a finite number, got {value!r}.")


@strict(accept_kwargs=True)
class COMIConfig(PreTrainedConfig):
    r"""
    Configuration of a COMI model: a decoder-only backbone (`text_config`) used three times,
    as a truncated encoder, as the layer-wise semantic alignment (LSA) block, and as the
    full decoder, with the MIG compressor between encoder and LSA.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the decoder-only backbone (Qwen2, Qwen3, Llama, Mistral, ...).
            Defaults to a default `Qwen2Config`.
        encoder_layers (`int`, defaults to 8):
            Number of backbone layers the context encoder keeps (the first ones).
        num_mem_fusion_layers (`int`, defaults to 1):
            Depth of the LSA block, made of backbone decoder layers plus the final norm.
            `0` replaces it with a `Linear(hidden, hidden)` map (initialised to the identity).
        merge_size (`int`, defaults to 16):
            Context tokens per memory vector before reallocation (the compression ratio).
        merge_sizes (`list[int]`, *optional*):
            Merge sizes to sample from, one per batch, during training.
        segment_size (`int`, defaults to 10000):
            Contexts longer than this many tokens are encoded and compressed segment by segment.
        coarse_grained (`bool`, defaults to `True`): run the coarse stage (group reallocation).
        fine_grained (`bool`, defaults to `True`): fuse groups with MIG weights (else: the mean).
        coarse_redundancy (`bool`, defaults to `True`): redundancy term in the coarse score.
        fine_redundancy (`bool`, defaults to `True`): redundancy term in the fine weights.
        alpha_select, beta_select (`float`, default to 1.0): coarse-stage relevance / redundancy weights.
        alpha_merge, beta_merge (`float`, default to 1.0): fine-stage relevance / redundancy weights.
        learnable_select_weights (`bool`, defaults to `False`): make `alpha_select`, `beta_select` parameters.
        learnable_merge_weights (`bool`, defaults to `False`): make `alpha_merge`, `beta_merge` parameters.

    Example:

    ```python
    >>> from transformers import Qwen2Config
    >>> from comi_hf import COMIConfig
    >>> backbone = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    ...                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    >>> config = COMIConfig(text_config=backbone, encoder_layers=2, merge_size=4)
    >>> config.encoder_config().num_hidden_layers
    2
    ```
    """

    model_type = "comi"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PreTrainedConfig | None = None
    encoder_layers: int = 8
    num_mem_fusion_layers: int = 1
    merge_size: int = 16
    merge_sizes: list[int] | None = None
    segment_size: int = 10000
    coarse_grained: bool = True
    fine_grained: bool = True
    coarse_redundancy: bool = True
    fine_redundancy: bool = True
    alpha_select: float = finite(default=1.0)
    beta_select: float = finite(default=1.0)
    alpha_merge: float = finite(default=1.0)
    beta_merge: float = finite(default=1.0)
    learnable_select_weights: bool = False
    learnable_merge_weights: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The decoder ties its LM head like the backbone does; mirror the flag so that
        # weight-tying helpers reading the top-level config agree with the backbone.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            # Reading another model's config as COMI would silently build the default backbone.
            raise ValueError(
                f"This is a `{model_type}` config, not a COMI one. To build COMI from a decoder-only "
                "backbone use `COMIForConditionalGeneration.from_backbone`."
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_comi_fields(self):
        """Reject values the model cannot work with, naming the field."""
        for name in ("encoder_layers", "num_mem_fusion_layers", "merge_size", "segment_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an integer, got {value!r}.")
        backbone_layers = self.text_config.num_hidden_layers
        if not 1 <= self.encoder_layers <= backbone_layers:
            raise ValueError(
                f"`encoder_layers` must be between 1 and the backbone's {backbone_layers} layers, "
                f"got {self.encoder_layers}."
            )
        if not 0 <= self.num_mem_fusion_layers <= backbone_layers:
            raise ValueError(
                f"`num_mem_fusion_layers` must be between 0 and the backbone's {backbone_layers} layers, "
                f"got {self.num_mem_fusion_layers}."
            )
        if self.merge_size < 1:
            raise ValueError(f"`merge_size` must be >= 1, got {self.merge_size}.")
        if self.segment_size < 1:
            raise ValueError(f"`segment_size` must be >= 1, got {self.segment_size}.")
        if self.merge_sizes is not None:
            if not self.merge_sizes or any(
                isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in self.merge_sizes
            ):
                raise ValueError(f"`merge_sizes` must be a non-empty list of integers >= 1, got {self.merge_sizes!r}.")

    def _truncated_text_config(self, num_layers: int) -> PreTrainedConfig:
        config = copy.deepcopy(self.text_config)
        config.num_hidden_layers = num_layers
        # Per-layer lists (sliding/full attention, MoE layout) must stay as long as the stack.
        for name in ("layer_types", "mlp_layer_types"):
            layer_list = getattr(config, name, None)
            if isinstance(layer_list, list):
                setattr(config, name, layer_list[:num_layers])
        return config

    def encoder_config(self) -> PreTrainedConfig:
        """Backbone config truncated to the encoder's `encoder_layers` layers."""
        return self._truncated_text_config(self.encoder_layers)

    def lsa_config(self) -> PreTrainedConfig:
        """Backbone config truncated to the LSA block's `num_mem_fusion_layers` layers."""
        return self._truncated_text_config(self.num_mem_fusion_layers)


COMIConfig.register_for_auto_class()
