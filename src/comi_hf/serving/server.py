"""`comi-serve`: an HTTP service that answers with COMI, the decoder on a vLLM server.

    comi-serve --model MODEL_DIR --vllm-url http://127.0.0.1:8000 [--host 127.0.0.1] [--port 8080]

`POST /v1/answer` takes `{"context": ..., "question": ...}` (or `"questions": [...]`; texts or
token ids) with an optional `merge_size` and generation settings, and returns what
`pipeline("comi-qa")` returns. Requests that arrive together are compressed together (one
encoder and MIG pass); each question is then decoded by vLLM from prompt embeddings. A context
asked about again is taken from the encoded-context cache instead of being encoded again.
`GET /health` reports the decoder's state and the cache's hits and misses.

vLLM's prompt-embeddings endpoint deserialises the tensors sent to it: bind it to loopback (or a
private network) and expose only this service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hmac
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..errors_comi import COMIError, DecoderUnavailableError, UsageError
from ..loading import check_device
from .client import COMIServingClient, Question
from .decoder import VLLMReplicas, VLLMServerDecoder
from .sampling import vllm_sampling

__all__ = ["AnswerRequest", "CompressionBatcher", "create_app", "run"]

API_KEY_ENV = "COMI_SERVE_API_KEY"
# The generation settings a request may carry (the others of `generate` are refused by name).
SETTINGS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_strings",
    "num_return_sequences",
    "num_beams",
)


class AnswerRequest(BaseModel):
    """The body of `POST /v1/answer`."""

    # Strict: in lax mode pydantic turns `true` into the token id 1, `"0.5"` into a number and
    # `2.0` into 2; a body means what it says, or it is refused naming the field.
    model_config = ConfigDict(extra="forbid", strict=True)
    context: str | list[int]
    question: str | list[int] | None = None
    questions: list[str | list[int]] | None = None
    merge_size: int | None = None
    seed: int | None = None
    return_token_ids: bool = False
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_strings: str | list[str] | None = None
    num_return_sequences: int | None = None
    num_beams: int | None = None


@dataclass
class _Pending:
    questions: list[Question]
    merge_size: int | None
    future: asyncio.Future = field(repr=False)


class CompressionBatcher:
    """Compresses the questions of requests that arrive within `window` seconds of each other in
    one call, one call at a time (in a worker thread: the event loop keeps serving)."""

    def __init__(self, client: COMIServingClient, window: float = 0.005):
        self.client = client
        self.window = window
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    async def prompt_embeds(self, questions: list[Question], merge_size: int | None) -> list[torch.Tensor]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(questions, merge_size, future))
        return await future

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self.window)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for merge_size in dict.fromkeys(pending.merge_size for pending in batch):
                await self._compress([pending for pending in batch if pending.merge_size == merge_size], merge_size)

    async def _compress(self, group: list[_Pending], merge_size: int | None) -> None:
        """One pass over the group's questions, a context at a time; the requests get their inputs
        together at the end, so that the decoder receives them all at once and batches them instead
        of decoding a few at a time while the compressor holds the CPU (docs/serving.md)."""
        questions = [question for pending in group for question in pending.questions]
        try:
            embeds = await asyncio.to_thread(self.client.prompt_embeds, questions, merge_size)
        except Exception as error:  # handed to every request of the group, none is lost
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        start = 0
        for pending in group:
            if not pending.future.done():
                pending.future.set_result(embeds[start : start + len(pending.questions)])
            start += len(pending.questions)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


def create_app(client: COMIServingClient, *, api_key: str | None = None, max_request_bytes: int = 16 << 20):
    """The ASGI app of `comi-serve` around a [`COMIServingClient`] whose decoder is a vLLM server."""
    batcher = CompressionBatcher(client)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.aclose()
        await client.decoder.aclose()

    app = FastAPI(title="comi-serve", description="COMI question answering, the decoder on vLLM.", lifespan=lifespan)

    def error(status: int, message: str, code: str, field: str | None = None) -> JSONResponse:
        body = {"message": message, "code": code}
        if field is not None:
            body["param"] = field
        return JSONResponse(status_code=status, content={"error": body})

    def refusal(problem: COMIError) -> JSONResponse:
        """The answer to a `COMIError`: its status, code and field decide, never its wording."""
        return error(problem.status, str(problem), problem.code, problem.field)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, fields = [], []
        for problem in exc.errors():
            location = [part for part in problem.get("loc", ()) if part != "body"]
            where = ".".join(str(part) for part in location)
            problems.append(f"{where}: {problem['msg']}" if where else problem["msg"])
            if location and isinstance(location[0], str):  # a field's name (an unknown one too), not a position
                fields.append(location[0])
        # A body that is not JSON has no field at fault (its location is a character position);
        # otherwise the first field named is the param.
        return refusal(COMIError("invalid request: " + "; ".join(problems), field=fields[0] if fields else None))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key (send `Authorization: Bearer <key>`)", "unauthorized")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            return error(
                413,
                f"the request has {length} bytes, more than this server's limit of {max_request_bytes}",
                "request_too_large",
            )
        return await call_next(request)

    @app.post("/v1/answer")
    async def answer(body: AnswerRequest):
        started = time.perf_counter()
        inputs = {"context": body.context}
        for name in ("question", "questions"):
            if getattr(body, name) is not None:
                inputs[name] = getattr(body, name)
        settings = {name: getattr(body, name) for name in SETTINGS if getattr(body, name) is not None}
        try:
            sampling = vllm_sampling(client.prompt_encoder.generation_config, seed=body.seed, **settings)
            questions, spans = client.questions(inputs, body.merge_size, sampling.max_tokens)
            await client.check_decoder(sampling)
            embeds = await batcher.prompt_embeds(questions, body.merge_size)
            completions = await client.decoder.complete_many(embeds, sampling)
        except COMIError as problem:
            if isinstance(problem, DecoderUnavailableError):
                client.forget_connection()
            return refusal(problem)
        (result,) = client.results(questions, spans, embeds, completions, body.return_token_ids)
        return JSONResponse(result, headers={"X-Process-Time": f"{time.perf_counter() - started:.4f}"})

    @app.get("/health")
    async def health():
        try:
            decoder = {"reachable": True, **(await client.connect())}
            status, code = "ok", 200
        except COMIError as problem:
            client.forget_connection()
            decoder = {"reachable": False, "error": str(problem)}
            status, code = "decoder unavailable", 503
        if isinstance(client.decoder, (VLLMServerDecoder, VLLMReplicas)):
            decoder["url"] = client.decoder.url
        content = {"status": status, "decoder": decoder, "cache": client.cache.stats()}
        return JSONResponse(status_code=code, content=content)

    return app


def check_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host (a vLLM server's base URL)."""
    try:
        # urlsplit raises on a bracketed host left open ("http://[::1"), .port on a port that is
        # not a number or out of range.
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018
    except ValueError as error:
        raise UsageError(f"--vllm-url {url!r}: {error}", field="vllm_url") from None
    # urlsplit keeps spaces in a host ("http://exa mple"), which no server has.
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise UsageError(
            f"--vllm-url {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000", field="vllm_url"
        )
    return url


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` and listening, or a [`UsageError`] saying why not (an unknown
    host, an address this machine lacks, a port in use or not allowed)."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise UsageError(f"cannot listen on {host}:{port}: unknown host ({error})", field="host") from None
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        reason = "the port is in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise UsageError(f"cannot listen on {host}:{port}: {reason}", field="port") from None
    return listener


def run(args: argparse.Namespace) -> None:
    """`comi-serve` with parsed arguments (see `comi_hf_cli.serve_parser`); problems are `COMIError`s."""
    import uvicorn

    urls = [check_url(url) for url in args.vllm_url]
    device = check_device(args.device)
    listener = listening_socket(args.host, args.port)
    try:
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        client = COMIServingClient.from_pretrained(
            args.model,
            vllm_url=urls[0] if len(urls) == 1 else urls,
            vllm_model=args.vllm_model,
            api_key=args.vllm_api_key,
            vllm_max_num_batched_tokens=args.vllm_max_num_batched_tokens,
            device=device,
            dtype=dtype,
            cache_bytes=args.cache_bytes,
            max_context_tokens=args.max_context_tokens,
        )
        api_key = args.api_key or os.environ.get(API_KEY_ENV)
        app = create_app(client, api_key=api_key, max_request_bytes=args.max_request_bytes)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
        server.run(sockets=[listener])
    finally:
        listener.close()
