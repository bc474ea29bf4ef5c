"""COMI model configuration."""

from __future__ import annotations

import copy
import math
import random
import sys

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .errors_comi import InvalidInputError

__all__ = ["COMIConfig", "draw_merge_size"]


@as_validated_field
def finite(value: float) -> None:
    """A MIG weight: a NaN or infinite one makes every score NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Value must be a finite number, got {value!r}.")


def at_least(minimum: int):
    """A field validator: an integer (not a bool) >= `minimum`."""

    @as_validated_field
    def validate(value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"Value must be an integer >= {minimum}, got {value!r}.")

    return validate


@as_validated_field
def merge_size_list(value: list[int] | None) -> None:
    if value is not None and (
        not value or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in value)
    ):
        raise ValueError(f"Value must be a non-empty list of integers >= 1, got {value!r}.")


def draw_merge_size(merge_sizes: list[int], generator: random.Random | None = None) -> int:
    """One of `merge_sizes`, uniformly: the merge size of one training batch (the official recipe
    samples it per batch).

    Drawn from Python's `random` (or `generator`), which `transformers.set_seed` seeds too, so
    that the draw leaves torch's random state (dropout, data order) as it is.
    """
    return (generator or random).choice(merge_sizes)


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
            With `learnable_merge_weights`, the model's parameters start from these values, and
            `save_pretrained` writes the learnt values here.
        learnable_merge_weights (`bool`, defaults to `False`): make `alpha_merge`, `beta_merge` parameters.
            (The coarse-stage weights cannot learn: that stage only decides integer group sizes,
            so no gradient reaches them.)
        tie_word_embeddings (`bool`, *optional*): the backbone's, mirrored for weight-tying helpers
            that read the top-level config; another value is refused.

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
    encoder_layers: int = at_least(1)(default=8)
    num_mem_fusion_layers: int = at_least(0)(default=1)
    merge_size: int = at_least(1)(default=16)
    merge_sizes: list[int] | None = merge_size_list(default=None)
    segment_size: int = at_least(1)(default=10000)
    coarse_grained: bool = True
    fine_grained: bool = True
    coarse_redundancy: bool = True
    fine_redundancy: bool = True
    alpha_select: float = finite(default=1.0)
    beta_select: float = finite(default=1.0)
    alpha_merge: float = finite(default=1.0)
    beta_merge: float = finite(default=1.0)
    learnable_merge_weights: bool = False
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        # Configs saved before `learnable_select_weights` was removed carry it as False.
        if kwargs.pop("learnable_select_weights", False):
            raise InvalidInputError(
                "`learnable_select_weights` is not supported: the coarse stage only decides integer group sizes, "
                "so `alpha_select` / `beta_select` would never receive a gradient.",
                field="learnable_select_weights",
            )
        super().__post_init__(**kwargs)
        _drop_registered_pipeline(self)
        backbone_ties = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings is not None and self.tie_word_embeddings != backbone_ties:
            raise InvalidInputError(
                f"`tie_word_embeddings` follows the backbone's ({backbone_ties}); set it in `text_config`.",
                field="tie_word_embeddings",
            )
        self.tie_word_embeddings = backbone_ties

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            # Reading another model's config as COMI would silently build the default backbone.
            raise InvalidInputError(
                f"This is a `{model_type}` config, not a COMI one. To build COMI from a decoder-only "
                "backbone use `COMIForConditionalGeneration.from_backbone`.",
                field="model_type",
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_comi_fields(self):
        """Checks across fields: the depths fit in the backbone."""
        backbone_layers = self.text_config.num_hidden_layers
        if self.encoder_layers > backbone_layers:
            raise InvalidInputError(
                f"`encoder_layers` must be between 1 and the backbone's {backbone_layers} layers, "
                f"got {self.encoder_layers}.",
                field="encoder_layers",
            )
        if self.num_mem_fusion_layers > backbone_layers:
            raise InvalidInputError(
                f"`num_mem_fusion_layers` must be between 0 and the backbone's {backbone_layers} layers, "
                f"got {self.num_mem_fusion_layers}.",
                field="num_mem_fusion_layers",
            )

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


def _drop_registered_pipeline(config: COMIConfig) -> None:
    """Drop the saved `custom_pipelines` entry of a task the installed comi_hf has registered.

    A saved COMI directory names its pipeline for `pipeline(model=directory, trust_remote_code=True)`
    where comi_hf is not installed. Where comi_hf is imported, transformers would still demand
    `trust_remote_code` for a task the config names, though the registered pipeline (the same code)
    serves it: without the entry, `pipeline("comi-qa", model=directory)` just works. A config read
    with remote code (this file loaded from the directory, not from the package) keeps the entry,
    so that `trust_remote_code=True` still infers the task and loads the shipped pipeline.
    """
    entries = getattr(config, "custom_pipelines", None)
    pipelines = sys.modules.get("transformers.pipelines")
    if not entries or pipelines is None or not __name__.startswith("comi_hf."):
        return
    registered = set(pipelines.PIPELINE_REGISTRY.get_supported_tasks())
    remaining = {task: entry for task, entry in entries.items() if task not in registered}
    if remaining:
        config.custom_pipelines = remaining
    else:
        del config.custom_pipelines


COMIConfig.register_for_auto_class()
