"""The work behind `comi-serve`'s endpoints: a request checked, compressed fairly, decoded by vLLM.

[`COMIService`] holds the serving client, the server's limits, the fair compressor and the
metrics; the endpoints (`server.py`) turn its results into COMI's or OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..processing_comi import StreamedAnswer
from .admission import DEFAULT_ROUND_QUESTIONS, DEFAULT_SLICE_QUESTIONS, FairCompressor, Limits
from .client import COMIServingClient, Question
from .decoder import Completion
from .metrics import ServingMetrics
from .sampling import VLLMSampling, vllm_sampling

__all__ = ["Asked", "COMIService", "Decoded"]


@dataclass
class Asked:
    """A checked request: its questions, how they group into inputs, and how to decode them."""

    questions: list[Question]
    spans: list[tuple[int, int, bool]]
    sampling: VLLMSampling
    merge_size: int | None

    @property
    def context_tokens(self) -> int:
        return len(self.questions[0].context_ids)


@dataclass
class Decoded:
    """New text of one sequence (`sequence` of question `question`) as vLLM decodes it; on the last
    piece of a sequence, why it ended and how many tokens it has."""

    question: int
    sequence: int
    text: str
    finish_reason: str | None
    tokens: int


class COMIService:
    """What `comi-serve` does for a request, whatever its API.

    Args:
        client: the serving client (compressor here, decoder on vLLM).
        limits: what one request may ask for.
        slice_questions, round_questions: the fair compressor's slice and round sizes.
    """

    def __init__(
        self,
        client: COMIServingClient,
        limits: Limits,
        slice_questions: int = DEFAULT_SLICE_QUESTIONS,
        round_questions: int = DEFAULT_ROUND_QUESTIONS,
    ):
        self.client = client
        self.limits = limits
        self.compressor = FairCompressor(client, slice_questions, round_questions, on_round=self._round_done)
        self.metrics = ServingMetrics(
            client.cache, lambda: (self.compressor.waiting_requests, self.compressor.waiting_questions)
        )

    def _round_done(self, questions: int, seconds: float) -> None:
        self.metrics.rounds.inc()

    async def ask(self, inputs: dict, merge_size: int | None, seed: int | None, settings: dict, count: int) -> Asked:
        """Everything checked before any compression: the settings, the limits (`count` questions),
        the inputs, and whether the decoder can honour the settings."""
        sampling = vllm_sampling(self.client.prompt_encoder.generation_config, seed=seed, **settings)
        self.limits.check(count, sampling.n, sampling.max_tokens)
        questions, spans = self.client.questions(inputs, merge_size, sampling.max_tokens)
        await self.client.check_decoder(sampling)
        return Asked(questions, spans, sampling, merge_size)

    async def compress(self, asked: Asked) -> list[torch.Tensor]:
        """Each question's decoder input, compressed in fair turns with the other requests."""
        embeds, waited, compressing = await self.compressor.prompt_embeds(asked.questions, asked.merge_size)
        self.metrics.phases(queue=waited, compression=compressing)
        context = sum(len(question.context_ids) + len(question.query_ids) for question in asked.questions)
        self.metrics.count_tokens(context=context, memory=sum(self.memory(asked, embeds)))
        return embeds

    async def answer(self, asked: Asked) -> tuple[list[torch.Tensor], list[list[Completion]]]:
        """Every question's decoder input and its sequences, decoded whole."""
        embeds = await self.compress(asked)
        started = time.perf_counter()
        completions = await self.client.decoder.complete_many(embeds, asked.sampling)
        self.metrics.phases(decoding=time.perf_counter() - started)
        self.metrics.count_tokens(generated=sum(len(c.token_ids) for sequences in completions for c in sequences))
        return embeds, completions

    async def stream(self, asked: Asked, embeds: list[torch.Tensor]) -> AsyncIterator[Decoded]:
        """Every question's sequences as vLLM decodes them, all at once; a sequence's pieces of text
        joined are its answer (`decode_answers` of its tokens)."""
        queue: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()

        async def one(position: int, prompt: torch.Tensor) -> None:
            texts: dict[int, StreamedAnswer] = {}
            async for tokens in self.client.decoder.stream(prompt, asked.sampling, turn=position):
                text = texts.setdefault(tokens.sequence, StreamedAnswer(self.client.tokenizer))
                piece = text.add(tokens.token_ids)
                self.metrics.count_tokens(generated=len(tokens.token_ids))
                if tokens.finish_reason is not None:
                    piece += text.finish()
                if piece or tokens.finish_reason is not None:
                    decoded = Decoded(position, tokens.sequence, piece, tokens.finish_reason, len(text.token_ids))
                    await queue.put(decoded)

        async def every_question() -> None:
            try:
                await asyncio.gather(*(one(position, prompt) for position, prompt in enumerate(embeds)))
            finally:
                await queue.put(None)

        task = asyncio.create_task(every_question())
        try:
            while (decoded := await queue.get()) is not None:
                yield decoded
            await task  # its exception, if any
            self.metrics.phases(decoding=time.perf_counter() - started)
        finally:
            task.cancel()

    @staticmethod
    def memory(asked: Asked, embeds: list[torch.Tensor]) -> list[int]:
        """Each question's memory vectors (its decoder input less its own tokens)."""
        return [
            prompt.shape[0] - len(question.query_ids) for prompt, question in zip(embeds, asked.questions, strict=True)
        ]

    def figures(self, asked: Asked, embeds: list[torch.Tensor]) -> dict:
        """COMI's figures: the context's tokens, each question's memory vectors, the compression."""
        memory = self.memory(asked, embeds)
        ratios = [asked.context_tokens / count for count in memory]
        if len(memory) == 1:
            return {"context_tokens": asked.context_tokens, "memory_tokens": memory[0], "compression_ratio": ratios[0]}
        return {"context_tokens": asked.context_tokens, "memory_tokens": memory, "compression_ratio": ratios}

    async def aclose(self) -> None:
        await self.compressor.aclose()
        await self.client.decoder.aclose()
