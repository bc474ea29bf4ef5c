"""A vLLM logits processor: transformers' repetition penalty over the generated tokens only.

COMI hands vLLM its decoder input as prompt embeddings. transformers' `generate` from
`inputs_embeds` penalises the tokens it generates, and nothing else: the prompt has no token
ids. vLLM's own `repetition_penalty` also counts the prompt's token ids, and for an embeddings
prompt it has none: vLLM 0.32 then reads whatever ids its batch slot held before (zeros on a
fresh server, an earlier request's prompt otherwise), so the same request can get different
answers. This processor applies the penalty exactly as transformers' `RepetitionPenaltyLogitsProcessor`
does, to the tokens the request has generated so far, before temperature and top-k/top-p (where
vLLM applies its own penalties).

It acts on the requests that carry `vllm_xargs={"comi_repetition_penalty": p}` (the
`extra_args` of their sampling parameters) and leaves every other request alone. vLLM loads it
from the `vllm.logits_processors` entry point of the `comi_hf` distribution: install comi_hf
into vLLM's environment without its dependencies (`pip install --no-deps comi_hf`, or `-e .` from
a clone); this module imports vLLM and torch only.
"""

from __future__ import annotations

import math

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

__all__ = ["EXTRA_ARG", "OutputRepetitionPenalty"]

EXTRA_ARG = "comi_repetition_penalty"


class OutputRepetitionPenalty(LogitsProcessor):
    """`comi_repetition_penalty` (> 0) over each request's generated tokens."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"`{EXTRA_ARG}` must be a finite number > 0, got {value!r}.")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # Batch index -> (penalty, the request's live list of generated token ids).
        self.penalties: dict[int, tuple[float, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # a penalty can change the greedy choice

    @staticmethod
    def _penalty(params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]):
        value = (params.extra_args or {}).get(EXTRA_ARG)
        return None if value is None or value == 1.0 else (float(value), output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.penalties, batch_update, self._penalty)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (penalty, output_ids) in self.penalties.items():
            if not output_ids:
                continue
            ids = torch.tensor(sorted(set(output_ids)), dtype=torch.long, device=logits.device)
            scores = logits[index, ids]
            logits[index, ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
        return logits
