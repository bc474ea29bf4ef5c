"""`generate`'s settings as vLLM sampling parameters, or a clear refusal.

A served answer must be the answer `COMIForConditionalGeneration.generate` gives with the same
settings, so every setting either maps onto vLLM exactly or is refused; none is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import GenerationConfig

from ..errors_comi import InvalidInputError, UnsupportedSettingError
from ..generation_comi import check_generation_values, update_generation_config

__all__ = ["REPETITION_PENALTY_ARG", "VLLMSampling", "vllm_sampling"]

# The extra argument of comi_hf's vLLM logits processor (`comi_hf_vllm`), which applies
# transformers' repetition penalty to the generated tokens only.
REPETITION_PENALTY_ARG = "comi_repetition_penalty"
# vLLM's API takes a signed 64-bit seed; a larger one is refused there, after the compression.
SEED_RANGE = (-(2**63), 2**63 - 1)

# Settings that mean nothing for the tokens chosen (caching, outputs, ids of special tokens the
# decoder does not read), or only with beam search, which is refused.
_NO_EFFECT = {
    "_from_model_config",
    "transformers_version",
    "pad_token_id",
    "bos_token_id",
    "decoder_start_token_id",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "continuous_batching_config",
    "prefill_chunk_size",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "low_memory",
    "length_penalty",
    "early_stopping",
    "max_length",
}
_MAPPED = {
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "stop_strings",
    "eos_token_id",
    "num_return_sequences",
}


@dataclass
class VLLMSampling:
    """vLLM sampling parameters equal to a resolved `GenerationConfig`.

    `request_fields()` gives the fields of a `/v1/completions` request; `sampling_params_kwargs()`
    the keyword arguments of `vllm.SamplingParams` for an in-process engine.
    """

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0

    @property
    def seeded(self) -> bool:
        """Whether vLLM samples with a generator of this request's own (a seed, and not greedy)."""
        return self.seed is not None and self.temperature > 0

    def _common(self) -> dict:
        fields = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "n": self.n,
            "stop_token_ids": self.stop_token_ids,
            # vLLM's own penalty would also count placeholder prompt ids (see `comi_hf_vllm`).
            "repetition_penalty": 1.0,
        }
        if self.seed is not None:
            fields["seed"] = self.seed
        if self.stop:
            fields["stop"] = self.stop
        return fields

    def request_fields(self) -> dict:
        fields = self._common()
        if self.repetition_penalty != 1.0:
            fields["vllm_xargs"] = {REPETITION_PENALTY_ARG: self.repetition_penalty}
        return fields

    def sampling_params_kwargs(self) -> dict:
        fields = self._common()
        if self.repetition_penalty != 1.0:
            fields["extra_args"] = {REPETITION_PENALTY_ARG: self.repetition_penalty}
        return fields


def vllm_sampling(base: GenerationConfig, seed: int | None = None, **generate_kwargs) -> VLLMSampling:
    """The vLLM equivalent of `generate(**generate_kwargs)` on a model whose config is `base`.

    Settings resolve as in `generate` (the call's over the model's, transformers' defaults for
    the rest); `seed` seeds sampling (vLLM draws per request, so a seeded request gives the same
    tokens whatever else the server runs). Raises [`UnsupportedSettingError`] naming every setting
    that vLLM cannot reproduce (beam search, n-gram bans, ...) and every unknown argument.
    """
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]
    ):
        raise InvalidInputError(
            f"`seed` must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r:.40}.", field="seed"
        )
    config = GenerationConfig.from_dict(base.to_dict())
    unused = update_generation_config(config, generate_kwargs)
    if unused:
        raise UnsupportedSettingError(
            f"generation argument(s) {sorted(unused)} cannot be sent to vLLM (only generation settings are; "
            "streamers, logits processors and stopping criteria run inside `generate` only).",
            field=sorted(unused)[0],
        )
    check_generation_values(config)
    defaults = GenerationConfig._get_default_generation_params()
    refused = [
        name
        for name, value in config.to_dict().items()
        if name not in _MAPPED | _NO_EFFECT and value is not None and value != defaults.get(name)
    ]
    if refused:
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in sorted(refused))
        beams = " (it has no beam search for prompt embeddings)" if "num_beams" in refused else ""
        raise UnsupportedSettingError(
            f"vLLM's prompt-embeddings API cannot reproduce {settings}{beams}", field=sorted(refused)[0]
        )
    if config.max_new_tokens is None:
        raise UnsupportedSettingError(
            "give `max_new_tokens` (a `max_length` counts prompt positions vLLM does not see)", field="max_new_tokens"
        )
    sampling = bool(config.do_sample)
    value = {
        name: getattr(config, name) if getattr(config, name) is not None else defaults.get(name) for name in _MAPPED
    }
    if value["num_return_sequences"] > 1 and not sampling:
        raise UnsupportedSettingError(
            "num_return_sequences > 1 needs do_sample=True (greedy decoding has one answer)",
            field="num_return_sequences",
        )
    if seed is not None and sampling and seed + value["num_return_sequences"] - 1 > SEED_RANGE[1]:
        # Sequence i is sampled with seed + i (as vLLM seeds a request's sequences; comi_hf sends them apart).
        raise InvalidInputError(
            f"with {value['num_return_sequences']} return sequences, sampled with seeds `seed` to "
            f"`seed` + {value['num_return_sequences'] - 1}, `seed` must be at most "
            f"{SEED_RANGE[1] - value['num_return_sequences'] + 1}, got {seed}.",
            field="seed",
        )
    penalty = value["repetition_penalty"]
    if not math.isfinite(penalty) or penalty <= 0:
        raise UnsupportedSettingError(
            f"repetition_penalty must be a finite number > 0, got {penalty!r}", field="repetition_penalty"
        )
    eos = value["eos_token_id"]
    stop_strings = value["stop_strings"] or []
    return VLLMSampling(
        max_tokens=int(value["max_new_tokens"]),
        temperature=float(value["temperature"]) if sampling else 0.0,
        top_p=float(value["top_p"]) if sampling else 1.0,
        top_k=int(value["top_k"]) if sampling and value["top_k"] else -1,
        min_p=float(value["min_p"] or 0.0) if sampling else 0.0,
        min_tokens=int(value["min_new_tokens"] or 0),
        n=int(value["num_return_sequences"]),
        seed=seed,
        stop=[stop_strings] if isinstance(stop_strings, str) else list(stop_strings),
        stop_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        repetition_penalty=float(penalty),
    )
