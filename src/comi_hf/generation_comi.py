"""How COMI generates: the official evaluation's settings, the call's settings resolved as `generate`
resolves them, and the settings and checks for a decoder served elsewhere (vLLM).

The decoder reads an embeddings prompt (`[memory ; query]`), which changes two things that a
plain causal LM gets for free: the repetition penalty must be applied here (see
[`resolve_generation_settings`]), and a served decoder must not apply its own over placeholder ids.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.utils import logging as hf_logging

from .errors_comi import InvalidInputError, ModelLoadError, NonFiniteError, UnsupportedSettingError

__all__ = [
    "FiniteLogitsCheck",
    "check_generation_values",
    "check_servable",
    "check_stop_strings",
    "official_generation_config",
    "resolve_generation_settings",
    "saved_generation_config",
    "serving_generation_config",
    "update_generation_config",
    "warn_past_positions",
]

logger = hf_logging.get_logger(__name__)


def official_generation_config(config) -> GenerationConfig:
    """Generation settings of the official COMI evaluation: greedy, 20 new tokens, repetition penalty 1.3.

    Args:
        config: a `COMIConfig` (its text config gives the BOS, EOS and padding ids).
    """
    text_config = config.get_text_config()
    eos_token_id = getattr(text_config, "eos_token_id", None)
    pad_token_id = getattr(text_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=20,
        repetition_penalty=1.3,
        bos_token_id=getattr(text_config, "bos_token_id", None),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


# Integer settings and their least values; number settings as (least, whether the least is
# allowed, most or `None`).
# Integers past int32 are no setting anyone means, and overflow the decoder's (vLLM's) own checks.
_MOST_INTEGER = 2**31 - 1
_INTEGERS = {"max_new_tokens": 1, "min_new_tokens": 0, "num_return_sequences": 1, "num_beams": 1, "top_k": 0}
_NUMBERS = {
    "temperature": (0.0, True, None),
    "top_p": (0.0, False, 1.0),
    "min_p": (0.0, True, 1.0),
    "repetition_penalty": (0.0, False, None),
}


def check_generation_values(config: GenerationConfig) -> None:
    """Refuse generation settings of the wrong type or out of range, naming the setting: what
    `generate`'s samplers refuse one by one (a temperature of 0 with sampling, a top_p of 2), and
    what they would take silently (2.5 new tokens, a NaN temperature)."""
    for name, least in _INTEGERS.items():
        value = getattr(config, name, None)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not least <= value <= _MOST_INTEGER
        ):
            raise InvalidInputError(
                f"`{name}` must be an integer from {least} to {_MOST_INTEGER}, got {value!r:.40}.", field=name
            )
    if (config.min_new_tokens or 0) > (config.max_new_tokens or _MOST_INTEGER):
        raise InvalidInputError(
            f"`min_new_tokens` ({config.min_new_tokens}) is more than `max_new_tokens` ({config.max_new_tokens}).",
            field="min_new_tokens",
        )
    stop_strings = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings or []
    if any(not isinstance(text, str) or not text for text in stop_strings):
        raise InvalidInputError(
            f"`stop_strings` must be non-empty strings, got {stop_strings!r:.80}.", field="stop_strings"
        )
    for name, (least, inclusive, most) in _NUMBERS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"`{name}` must be a finite number, got {value!r}.", field=name)
        if value < least or (value == least and not inclusive) or (most is not None and value > most):
            bounds = f"{'>=' if inclusive else '>'} {least:g}" + (f" and <= {most:g}" if most is not None else "")
            raise InvalidInputError(f"`{name}` must be {bounds}, got {value!r}.", field=name)
    if config.do_sample and config.temperature == 0:
        raise InvalidInputError(
            "`temperature` 0 means greedy decoding: ask with do_sample=False (or a temperature > 0).",
            field="temperature",
        )


class FiniteLogitsCheck(LogitsProcessor):
    """Stop generation with a [`NonFiniteError`] when the decoder's scores hold NaN or +inf, or a
    row has no finite score: greedy search would otherwise pick token 0 at every step and the
    answer would be empty (a decoder with damaged weights, or one that overflows in float16)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        broken = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bool(broken.any()):
            rows = broken.nonzero().flatten().tolist()
            raise NonFiniteError(
                f"The decoder's scores are NaN or infinite for sequence(s) {rows} at new token "
                f"{input_ids.shape[1]} ({scores.dtype}): its weights or its inputs are broken, or it overflows "
                "in half precision (try float32 or bfloat16).",
                rows,
            )
        return scores


def update_generation_config(config: GenerationConfig, settings: dict) -> dict:
    """`config.update(**settings)` (returns the arguments that are not generation settings), with
    transformers' own validation failures as an `InvalidInputError`."""
    try:
        return config.update(**settings)
    except ValueError as error:
        raise InvalidInputError(str(error), field=_named_setting(str(error), settings)) from None


def _named_setting(message: str, settings: dict) -> str | None:
    return next((name for name in settings if f"`{name}`" in message), None)


def check_stop_strings(stop_strings: str | list[str] | None, tokenizer) -> None:
    """Refuse `stop_strings` that transformers' `StopStringCriteria` cannot match with `tokenizer`
    (it needs the tokenizer, and a vocabulary that can spell any text: a closed word-level
    vocabulary like the default model's cannot)."""
    if not stop_strings:
        return
    if tokenizer is None:
        raise InvalidInputError("`stop_strings` are matched as text: pass `tokenizer=`.", field="stop_strings")
    try:
        StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    except ValueError as error:
        raise UnsupportedSettingError(
            f"`stop_strings` cannot be matched with this tokenizer ({type(tokenizer).__name__}): transformers' "
            f"StopStringCriteria spells every vocabulary entry after a probe text, which its vocabulary cannot "
            f"spell ({error}); stop on token ids with `eos_token_id=[...]` instead.",
            field="stop_strings",
        ) from None


# The `from_pretrained` arguments that say where a checkpoint's files are.
_HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


def saved_generation_config(pretrained_model_name_or_path, loading_kwargs: dict, config) -> GenerationConfig:
    """The generation settings saved beside a checkpoint, else the official evaluation's (a
    checkpoint converted from the official code saves none)."""
    hub = {name: loading_kwargs[name] for name in _HUB_OPTIONS if name in loading_kwargs}
    saved = os.path.join(str(pretrained_model_name_or_path), hub.get("subfolder", ""), "generation_config.json")
    try:
        return GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    except (OSError, ValueError) as error:
        if os.path.isfile(saved):  # there, but not a generation config: not to be replaced in silence
            raise ModelLoadError(f"{saved} is not a valid generation config: {str(error).splitlines()[0]}") from None
        return official_generation_config(config)


def resolve_generation_settings(
    model_settings: GenerationConfig,
    generation_config: GenerationConfig | None,
    logits_processor: LogitsProcessorList | None,
    kwargs: dict,
    prompt_len: int,
    tokenizer=None,
) -> tuple[GenerationConfig, LogitsProcessorList, dict, int]:
    """Resolve the settings as `generate` does (call arguments > the given config > the model's),
    and check them (values in range, `stop_strings` that `tokenizer` can match).

    Returns the resolved config, the logits processors, the call arguments that are not
    generation settings (for `generate` itself), and the number of new tokens at most.
    """
    generation_config = copy.deepcopy(generation_config if generation_config is not None else model_settings)
    generation_config.update(**model_settings.to_dict(), defaults_only=True, allow_custom_entries=True)
    generate_kwargs = update_generation_config(generation_config, kwargs)
    check_generation_values(generation_config)
    check_stop_strings(generation_config.stop_strings, tokenizer or generate_kwargs.get("tokenizer"))
    new_tokens = generation_config.max_new_tokens
    if new_tokens is None:
        new_tokens = max(generation_config.max_length - prompt_len, 0)
    processors = LogitsProcessorList(logits_processor or [])
    penalty = generation_config.repetition_penalty
    # `generate` skips each sample's left-padding length of the token history when it applies
    # this penalty; with an embeddings prompt that history holds only new tokens, so padded
    # samples would escape it. Apply it here, over all of them, and keep the decoder from adding
    # its own.
    generation_config.repetition_penalty = 1.0
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    processors.append(FiniteLogitsCheck())
    return generation_config, processors, generate_kwargs, new_tokens


def warn_past_positions(model: nn.Module, decoder_len: int, new_tokens: int = 0) -> None:
    """Warn (once per model) when the decoder reads more positions than it was trained for."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None or decoder_len + new_tokens <= limit or getattr(model, "_warned_past_positions", False):
        return
    model._warned_past_positions = True
    logger.warning(
        "The decoder reads %d positions (memory vectors and query%s), more than its max_position_embeddings "
        "(%d): its answers past that length are unreliable. Compress more (a larger merge_size) or truncate "
        "the context.",
        decoder_len + new_tokens,
        f", and up to {new_tokens} new tokens" if new_tokens else "",
        limit,
    )


def check_servable(decoder: nn.Module) -> None:
    """Refuse a decoder vLLM cannot serve as saved (LoRA adapters, a dtype it lacks); warn about a
    head dim its CPU backend refuses."""
    lora = [name for name, _ in decoder.named_parameters() if "lora_" in name]
    if lora:
        raise ModelLoadError(f"The decoder still holds LoRA adapters ({lora[0]}, ...): merge them first.")
    dtype = decoder.get_input_embeddings().weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(f"vLLM serves float32, float16 or bfloat16 weights, not {dtype}: convert the model first.")
    text_config = decoder.config
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if head_dim < 32:
        logger.warning(
            "The decoder's head_dim is %d: vLLM's CPU attention backend refuses head dims below 32 "
            "(GPU backends may serve it).",
            head_dim,
        )


def serving_generation_config(settings: GenerationConfig) -> GenerationConfig:
    """The generation config saved beside a served decoder: EOS and length settings, no repetition
    penalty (vLLM's own also counts the placeholder prompt ids of prompt embeddings; comi_hf's
    clients send the penalty to its vLLM logits processor instead)."""
    return GenerationConfig(
        do_sample=bool(settings.do_sample),
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=settings.eos_token_id,
        pad_token_id=settings.pad_token_id,
        bos_token_id=settings.bos_token_id,
    )
