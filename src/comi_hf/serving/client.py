"""Answer questions with COMI's compressor here and the decoder on vLLM.

    client = COMIServingClient.from_pretrained("comi-model", vllm_url="http://127.0.0.1:8000")
    client.answer(context=document, question="...")            # {"answer", "context_tokens", ...}
    client.answer(context=document, questions=["...", "..."])  # the document encoded once
    client.answer([{"context": ..., "question": ...}, ...])    # a batch: compressed together

The compressor ([`COMIPromptEncoder`]: encoder, MIG, LSA and the decoder's token embeddings)
builds each question's decoder input, exactly what `COMIForConditionalGeneration.generate`
feeds its decoder, and vLLM decodes it from prompt embeddings; all the questions of a call are
in flight at once, so that vLLM batches them. Results have the shape of `pipeline("comi-qa")`'s.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

import torch

from ..errors_comi import InvalidInputError
from ..modeling_comi import COMIPromptEncoder
from ..processing_comi import (
    answer_records,
    check_decoder_positions,
    check_merge_size,
    decode_answers,
    gather_inputs,
    pad_token_lists,
    prepare_inputs,
)
from .cache import EncodedContextCache
from .decoder import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    VLLMEngineDecoder,
    VLLMReplicas,
    VLLMServerDecoder,
    missing_penalty_processor,
)
from .sampling import VLLMSampling, vllm_sampling

__all__ = ["COMIServingClient", "Question"]


@dataclass
class Question:
    """One question about one context, as token ids."""

    context_ids: list[int]
    query_ids: list[int]


class COMIServingClient:
    """COMI answers from a compressor in this process and a decoder on vLLM.

    Args:
        prompt_encoder: the compressor side of the COMI model (`COMIPromptEncoder.from_pretrained`).
        tokenizer: the model's tokenizer.
        decoder: a [`VLLMServerDecoder`], [`VLLMReplicas`] or a [`VLLMEngineDecoder`].
        cache_bytes: budget of the encoded-context cache (0: every context is encoded anew).
        max_context_tokens: longer contexts are refused (`None`: no limit).
    """

    def __init__(
        self,
        prompt_encoder: COMIPromptEncoder,
        tokenizer,
        decoder: VLLMServerDecoder | VLLMEngineDecoder,
        *,
        cache_bytes: int = 1 << 30,
        max_context_tokens: int | None = None,
    ):
        self.prompt_encoder = prompt_encoder.eval()
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.cache = EncodedContextCache(cache_bytes)
        self.max_context_tokens = max_context_tokens
        self.vocab_size = prompt_encoder.get_input_embeddings().num_embeddings
        self._compress_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected: dict | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        vllm_url: str | list[str] | None = None,
        llm=None,
        vllm_model: str | None = None,
        api_key: str | None = None,
        vllm_max_num_batched_tokens: int | None = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        vllm_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        vllm_priority: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "auto",
        **kwargs,
    ) -> COMIServingClient:
        """The compressor of a saved COMI model (its decoder's layers are not loaded) and a decoder:
        the vLLM server at `vllm_url` (serving the model's exported decoder; a list of URLs for
        replicas, each prompt to the least busy), or `llm`, a `vllm.LLM`. `vllm_max_num_batched_tokens`
        is the servers' token budget per engine step, which seeded sampling is kept within (see
        [`SeededSamplingGuard`]; 0: no limit); `vllm_max_in_flight` and `vllm_priority` set how
        prompts queue for each server ([`FairDecoderSlots`])."""
        from ..loading import load_comi

        if (vllm_url is None) == (llm is None):
            raise InvalidInputError(
                "Give the decoder as `vllm_url` (a vLLM server) or as `llm` (a vllm.LLM), one of them.",
                field="vllm_url",
            )
        if llm is not None:
            decoder = VLLMEngineDecoder(llm)
        else:
            urls = [vllm_url] if isinstance(vllm_url, str) else vllm_url
            servers = [
                VLLMServerDecoder(
                    url,
                    vllm_model,
                    api_key,
                    max_num_batched_tokens=vllm_max_num_batched_tokens,
                    max_in_flight=vllm_max_in_flight,
                    priority=vllm_priority,
                )
                for url in urls
            ]
            decoder = servers[0] if isinstance(vllm_url, str) else VLLMReplicas(servers)
        prompt_encoder, tokenizer = load_comi(model, dtype=dtype, model_class=COMIPromptEncoder)
        return cls(prompt_encoder.to(device), tokenizer, decoder, **kwargs)

    # ------------------------------------------------------------------ compression
    def questions(
        self, inputs, merge_size: int | None = None, max_new_tokens: int = 0
    ) -> tuple[list[Question], list[tuple[int, int, bool]]]:
        """The questions of `answer`'s inputs, and per input (first question, count, several?).

        Inputs are checked at comi_hf's one input edge (`prepare_inputs`); a context longer than
        `max_context_tokens`, or whose memory, question and `max_new_tokens` would take the
        decoder past its positions, is a `ContextTooLongError` before any encoding.
        """
        merge_size = self.prompt_encoder.config.merge_size if merge_size is None else check_merge_size(merge_size)
        prepared = prepare_inputs(inputs, self.tokenizer, self.vocab_size, max_context_tokens=self.max_context_tokens)
        questions, spans = [], []
        for item in prepared:
            spans.append((len(questions), len(item.question_ids), item.several))
            for query_ids in item.question_ids:
                check_decoder_positions(
                    self.prompt_encoder.config, len(item.context_ids), len(query_ids), merge_size, max_new_tokens
                )
                questions.append(Question(item.context_ids, query_ids))
        return questions, spans

    @torch.no_grad()
    def prompt_embeds_by_context(self, questions: list[Question], merge_size: int | None = None):
        """Each question's decoder input `[memory ; query]`, `(positions, hidden)`, one context at a time.

        Yields `(positions, embeds)`: the questions (their positions in `questions`) about one
        distinct context and their inputs, compressed together. Each context is encoded once, or
        taken from the encoded-context cache. One context at a time bounds the memory and the
        copying: one batch of many long contexts copies every context's key/value cache for every
        question (docs/serving.md).
        """
        if merge_size is not None:
            check_merge_size(merge_size)
        device = self.prompt_encoder.device
        keys = [EncodedContextCache.key(question.context_ids) for question in questions]
        for key in dict.fromkeys(keys):
            positions = [position for position, other in enumerate(keys) if other == key]
            # One compression at a time: a model's forward is not meant to run in two threads at once.
            with self._compress_lock:
                encoding = self.cache.get(key)
                if encoding is None:
                    encoding = self.prompt_encoder.encode_context(
                        *_padded([questions[positions[0]].context_ids], device)
                    )
                    self.cache.put(key, encoding)
                query_ids, query_mask = _padded([questions[position].query_ids for position in positions], device)
                embeds = self.prompt_encoder.prompt_embeds(
                    query_ids=query_ids,
                    query_attention_mask=query_mask,
                    merge_size=merge_size,
                    context_encoding=encoding,
                )
            yield positions, embeds

    def prompt_embeds(self, questions: list[Question], merge_size: int | None = None) -> list[torch.Tensor]:
        """Every question's decoder input, in order (see [`prompt_embeds_by_context`])."""
        embeds: list[torch.Tensor | None] = [None] * len(questions)
        for positions, ready in self.prompt_embeds_by_context(questions, merge_size):
            for position, prompt in zip(positions, ready, strict=True):
                embeds[position] = prompt
        return embeds

    # ------------------------------------------------------------------ answering
    async def connect(self) -> dict:
        """Check the decoder (once): the served model, and comi_hf's repetition-penalty processor."""
        if self._connected is None:
            hidden_size = self.prompt_encoder.get_input_embeddings().embedding_dim
            self._connected = await self.decoder.connect(hidden_size)
        return self._connected

    async def check_decoder(self, sampling: VLLMSampling) -> None:
        """Connect (once) and refuse what the decoder cannot honour before any compression is spent
        on it: a repetition penalty where vLLM lacks comi_hf's logits processor."""
        connected = await self.connect()
        if sampling.repetition_penalty != 1.0 and not connected["output_repetition_penalty"]:
            raise missing_penalty_processor(sampling.repetition_penalty)

    def forget_connection(self) -> None:
        """Check the decoder again at the next call (after it was found unreachable)."""
        self._connected = None

    async def answer_async(
        self, inputs=None, *, merge_size: int | None = None, seed: int | None = None, return_token_ids=False, **kwargs
    ):
        """[`answer`], awaitable (for an event loop that is already running)."""
        inputs = gather_inputs(inputs, *(kwargs.pop(name, None) for name in ("context", "question", "questions")))
        generate_kwargs = kwargs
        sampling = vllm_sampling(self.prompt_encoder.generation_config, seed=seed, **generate_kwargs)
        questions, spans = self.questions(inputs, merge_size, sampling.max_tokens)
        await self.check_decoder(sampling)
        embeds = await asyncio.to_thread(self.prompt_embeds, questions, merge_size)
        completions = await self.decoder.complete_many(embeds, sampling)
        results = self.results(questions, spans, embeds, completions, return_token_ids)
        return results if isinstance(inputs, (list, tuple)) else results[0]

    def results(self, questions, spans, embeds, completions, return_token_ids: bool = False) -> list:
        """Per input, its `pipeline("comi-qa")`-shaped result (see [`questions`] for `spans`)."""
        results = []
        for first, count, several in spans:
            asked = range(first, first + count)
            answers = [decode_answers(self.tokenizer, [c.token_ids for c in completions[i]]) for i in asked]
            memory = [embeds[i].shape[0] - len(questions[i].query_ids) for i in asked]
            result = answer_records(answers, len(questions[first].context_ids), memory, several)
            if return_token_ids:
                _attach_token_ids(result, [[c.token_ids for c in completions[i]] for i in asked], several)
            results.append(result)
        return results

    def answer(self, inputs=None, **kwargs):
        """Answer questions about contexts, like `pipeline("comi-qa")`.

        Takes `context=` with `question=` or `questions=`, or a dict / list of dicts with those
        keys; contexts and questions are texts or token-id lists. Options: `merge_size`, `seed`
        (reproducible sampling), `return_token_ids` (add each answer's generated ids) and the
        generation settings of `generate` (`max_new_tokens`, `do_sample`, `temperature`, `top_p`,
        `top_k`, `repetition_penalty`, `stop_strings`, ...) over the model's (the official
        evaluation's: greedy, 20 new tokens, repetition penalty 1.3). A setting vLLM cannot
        reproduce (beam search, ...) is refused with an `UnsupportedSettingError`; every problem is a
        `COMIError` (see `comi_hf.errors_comi`).
        """
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self.answer_async(inputs, **kwargs))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self.decoder.aclose())
            self._loop.close()
            self._loop = None


def _attach_token_ids(result, token_ids: list[list[list[int]]], several: bool) -> None:
    if several:
        result["token_ids"] = [ids[0] if len(ids) == 1 else ids for ids in token_ids]
    elif isinstance(result, list):
        for entry, ids in zip(result, token_ids[0], strict=True):
            entry["token_ids"] = ids
    else:
        result["token_ids"] = token_ids[0][0]


def _padded(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_token_lists(sequences)
    return ids.to(device), mask.to(device)
