"""What `comi-serve` lets in, and in which order it compresses: limits per request, a body read
with its size counted as it arrives, and compression shared fairly between requests.

* [`Limits`]: questions, sequences (`n`), new tokens and body bytes per request; a request over a
  limit is refused (413 or 400) before any work.
* [`BodyReader`]: an ASGI middleware that reads a request's body, counting bytes as they arrive
  (a chunked body too, which has no `Content-Length`), refuses it past the limit, and hands JSON
  sent without `Content-Type: application/json` (what `curl -d` sends) to the app as JSON.
* [`FairCompressor`]: compresses waiting requests' questions in bounded slices, taken from each
  request in turn, so that a request of a thousand questions does not hold a one-question request
  behind it; a request whose client went away is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from ..errors_comi import COMIError, InvalidInputError
from .client import COMIServingClient, Question

__all__ = [
    "DEFAULT_ROUND_QUESTIONS",
    "DEFAULT_SLICE_QUESTIONS",
    "BodyReader",
    "FairCompressor",
    "Limits",
    "RequestTooLargeError",
]

# Small slices and rounds: a one-question request waits for at most one round of 8 questions
# behind large ones (docs/serving.md, Load and fairness).
DEFAULT_SLICE_QUESTIONS = 2
DEFAULT_ROUND_QUESTIONS = 8


class RequestTooLargeError(InvalidInputError):
    """A request over one of the server's limits (its body, questions, sequences or new tokens)."""

    status = 413
    code = "request_too_large"


@dataclass
class Limits:
    """The most one request may ask for; the defaults let through what real clients send.

    Attributes:
        max_questions: questions in one request (all its inputs together).
        max_sequences: sequences per question (`n`, `num_return_sequences`).
        max_new_tokens: new tokens per sequence.
        max_request_bytes: bytes of the request's body.
    """

    max_questions: int = 256
    max_sequences: int = 16
    max_new_tokens: int = 1024
    max_request_bytes: int = 16 << 20

    def check(self, questions: int, sequences: int, new_tokens: int) -> None:
        """Refuse a request over a limit, naming it (before any compression)."""
        for count, most, what, field_name in (
            (questions, self.max_questions, "questions", "questions"),
            (sequences, self.max_sequences, "sequences per question", "num_return_sequences"),
            (new_tokens, self.max_new_tokens, "new tokens", "max_new_tokens"),
        ):
            if count > most:
                raise RequestTooLargeError(
                    f"the request asks for {count} {what}, more than this server's limit of {most}", field=field_name
                )


class BodyReader:
    """ASGI middleware: the whole body read before the app sees the request, its bytes counted as
    they arrive (413 past `max_bytes`, chunked or not), and a JSON body on `json_paths` taken as
    JSON whatever `Content-Type` says (`curl -d` sends `application/x-www-form-urlencoded`)."""

    def __init__(self, app, max_bytes: int, json_paths: tuple[str, ...], refuse: Callable[[COMIError], object]):
        self.app = app
        self.max_bytes = max_bytes
        self.json_paths = json_paths
        self.refuse = refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                problem = RequestTooLargeError(
                    f"the request's body has more than this server's limit of {self.max_bytes} bytes"
                )
                return await self.refuse(problem)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"] in self.json_paths:
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, when it comes

        await self.app(scope, replay, send)


@dataclass
class _Job:
    questions: list[Question]
    merge_size: int | None
    future: asyncio.Future
    embeds: list[torch.Tensor | None] = field(default_factory=list)
    next_question: int = 0
    queued_at: float = field(default_factory=time.perf_counter)
    compress_seconds: float = 0.0

    @property
    def waiting(self) -> int:
        return len(self.questions) - self.next_question


class FairCompressor:
    """Compresses requests' questions in rounds of at most `round_questions`, taking at most
    `slice_questions` from each waiting request in turn (round robin), one round at a time in a
    worker thread. A request's inputs come back when all of its questions are compressed, so a
    one-question request waits at most about one round per request ahead of it, not for a large
    request to finish; a request cancelled while it waits (its client went away) is dropped.

    Args:
        client: the serving client whose compressor runs the rounds.
        slice_questions: questions taken from one request per round.
        round_questions: questions in one round at most (one compressor call per merge size).
        on_round: called with each round's `(questions, seconds)` (for metrics).
    """

    def __init__(
        self,
        client: COMIServingClient,
        slice_questions: int = DEFAULT_SLICE_QUESTIONS,
        round_questions: int = DEFAULT_ROUND_QUESTIONS,
        on_round: Callable[[int, float], None] | None = None,
    ):
        self.client = client
        self.slice_questions = slice_questions
        self.round_questions = round_questions
        self.on_round = on_round
        self._jobs: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def waiting_requests(self) -> int:
        return sum(1 for job in self._jobs if not job.future.done())

    @property
    def waiting_questions(self) -> int:
        return sum(job.waiting for job in self._jobs if not job.future.done())

    async def prompt_embeds(self, questions: list[Question], merge_size: int | None) -> tuple[list, float, float]:
        """Each question's decoder input, and the seconds the request waited and spent compressing."""
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work())
        job = _Job(questions, merge_size, asyncio.get_running_loop().create_future())
        job.embeds = [None] * len(questions)
        self._jobs.append(job)
        self._wake.set()
        embeds = await job.future  # cancelled with the request: the worker then skips it
        waited = time.perf_counter() - job.queued_at - job.compress_seconds
        return embeds, waited, job.compress_seconds

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                self._jobs = [job for job in self._jobs if not job.future.done()]
                if not self._jobs:
                    break
                await self._round(self._take())

    def _take(self) -> list[tuple[_Job, int, int]]:
        """This round's share of each job, `(job, first, end)`, in round-robin order; the jobs served
        go to the back of the line."""
        taken, budget, served = [], self.round_questions, 0
        for job in self._jobs:
            if budget <= 0:
                break
            count = min(self.slice_questions, job.waiting, budget)
            taken.append((job, job.next_question, job.next_question + count))
            job.next_question += count
            budget -= count
            served += 1
        self._jobs = self._jobs[served:] + self._jobs[:served]
        return taken

    async def _round(self, taken: list[tuple[_Job, int, int]]) -> None:
        for merge_size in dict.fromkeys(job.merge_size for job, _, _ in taken):
            group = [(job, first, end) for job, first, end in taken if job.merge_size == merge_size]
            questions = [question for job, first, end in group for question in job.questions[first:end]]
            started = time.perf_counter()
            try:
                embeds = await asyncio.to_thread(self.client.prompt_embeds, questions, merge_size)
            except Exception as error:  # handed to every request of the round, none is lost
                for job, _, _ in group:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            if self.on_round is not None:
                self.on_round(len(questions), seconds)
            position = 0
            for job, first, end in group:
                job.embeds[first:end] = embeds[position : position + end - first]
                position += end - first
                job.compress_seconds += seconds
                if job.waiting == 0 and not job.future.done():
                    job.future.set_result(job.embeds)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


async def unless_disconnected(receive_disconnect: Callable[[], Awaitable[bool]], work: Awaitable, poll: float = 0.25):
    """`await work`, cancelled when the client goes away (`receive_disconnect()` says so); returns
    `None` then. Starlette does not cancel a plain (non-streamed) handler when its client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await receive_disconnect():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
