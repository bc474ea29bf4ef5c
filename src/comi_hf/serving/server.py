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
import json
import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from ..errors_comi import COMIError, DecoderError, DecoderUnavailableError, UsageError
from ..loading import check_device
from ..processing_comi import StreamedAnswer, decode_answers
from . import openai_api
from .admission import BodyReader, FairCompressor, Limits, unless_disconnected
from .client import COMIServingClient, Question
from .decoder import Completion, VLLMReplicas, VLLMServerDecoder
from .metrics import ServingMetrics
from .sampling import VLLMSampling, vllm_sampling

__all__ = ["AnswerRequest", "create_app", "run"]

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
    stream: bool = False


# OpenAI's names for the generation settings its API maps onto `generate`'s (a refusal names the field sent).
_OPENAI_FIELDS = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "stop_strings": "stop",
    "do_sample": "temperature",
}
# The endpoints whose body is JSON whatever its Content-Type says.
_JSON_PATHS = ("/v1/answer", "/v1/chat/completions", "/v1/completions")


@dataclass
class _Asked:
    """A checked request: its questions, how they group into inputs, and how to decode them."""

    questions: list[Question]
    spans: list[tuple[int, int, bool]]
    sampling: VLLMSampling
    merge_size: int | None


def create_app(
    client: COMIServingClient,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    served_model_name: str = "comi",
    slice_questions: int = 8,
    round_questions: int = 32,
):
    """The ASGI app of `comi-serve` around a [`COMIServingClient`] whose decoder is a vLLM server.

    `/v1/answer` (COMI's own API), `/v1/chat/completions`, `/v1/completions` and `/v1/models`
    (OpenAI's: `openai_api.py`), `/health`, `/metrics`. Requests are checked against `limits` before
    any work, compressed fairly (`admission.FairCompressor`), and decoded by vLLM.
    """
    limits = limits or Limits()
    metrics: ServingMetrics | None = None
    compressor = FairCompressor(
        client, slice_questions, round_questions, on_round=lambda questions, seconds: metrics.rounds.inc()
    )
    metrics = ServingMetrics(client.cache, lambda: (compressor.waiting_requests, compressor.waiting_questions))
    log = logging.getLogger("comi_hf.serving")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await compressor.aclose()
        await client.decoder.aclose()

    app = FastAPI(title="comi-serve", description="COMI question answering, the decoder on vLLM.", lifespan=lifespan)

    def refusal(problem: COMIError, fields: dict | None = None) -> JSONResponse:
        """The answer to a `COMIError`: its status, code and field decide, never its wording. The
        body is OpenAI's error shape, so that OpenAI clients raise their own typed exceptions."""
        if isinstance(problem, DecoderError) and (problem.url or problem.detail):
            log.warning("%s [decoder %s: %s]", problem, problem.url, problem.detail)
        field_name = (fields or {}).get(problem.field, problem.field)
        kind = "server_error" if problem.status >= 500 else "invalid_request_error"
        if problem.status == 401:
            kind = "authentication_error"
        body = {"message": str(problem), "type": kind, "param": field_name, "code": problem.code}
        return JSONResponse(status_code=problem.status, content={"error": body})

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

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
        problem = COMIError("invalid request: " + "; ".join(problems), field=fields[0] if fields else None)
        return refusal(problem)

    app.add_middleware(
        BodyReader, max_bytes=limits.max_request_bytes, json_paths=_JSON_PATHS, refuse=lambda problem: refusal(problem)
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        open_paths = ("/health",)
        if request.url.path not in open_paths and not authorized(request):
            response = refusal(_Unauthorized("missing or wrong API key (send `Authorization: Bearer <key>`)"))
        else:
            response = await call_next(request)
        metrics.observe(request.url.path, response.status_code)
        return response

    async def ask(inputs: dict, merge_size: int | None, seed: int | None, settings: dict, questions: int) -> _Asked:
        """Everything checked before any compression: settings, limits, inputs, the decoder's means."""
        sampling = vllm_sampling(client.prompt_encoder.generation_config, seed=seed, **settings)
        limits.check(questions, sampling.n, sampling.max_tokens)
        asked, spans = client.questions(inputs, merge_size, sampling.max_tokens)
        await client.check_decoder(sampling)
        return _Asked(asked, spans, sampling, merge_size)

    async def compress(asked: _Asked) -> list[torch.Tensor]:
        embeds, waited, compressing = await compressor.prompt_embeds(asked.questions, asked.merge_size)
        metrics.phases(queue=waited, compression=compressing)
        for question, prompt in zip(asked.questions, embeds, strict=True):
            metrics.count_tokens(context=len(question.context_ids) + len(question.query_ids))
            metrics.count_tokens(memory=prompt.shape[0] - len(question.query_ids))
        return embeds

    async def answer_all(asked: _Asked) -> tuple[list[torch.Tensor], list[list[Completion]]]:
        embeds = await compress(asked)
        started = time.perf_counter()
        completions = await client.decoder.complete_many(embeds, asked.sampling)
        metrics.phases(decoding=time.perf_counter() - started)
        metrics.count_tokens(generated=sum(len(c.token_ids) for sequences in completions for c in sequences))
        return embeds, completions

    async def respond(request: Request, work, fields: dict | None = None) -> JSONResponse:
        """Run `work` (an awaitable giving the response), dropped if the client goes away; a
        `COMIError` is refused, an unreachable decoder forgotten until it answers again."""
        started = time.perf_counter()
        try:
            response = await unless_disconnected(request.is_disconnected, work)
        except COMIError as problem:
            if isinstance(problem, DecoderUnavailableError):
                client.forget_connection()
            return refusal(problem, fields)
        if response is None:  # the client went away: nobody reads this
            return JSONResponse(status_code=499, content={})
        metrics.phases(total=time.perf_counter() - started)
        response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.4f}"
        return response

    def stream(request: Request, events, fields: dict | None = None) -> StreamingResponse:
        """Server-sent events from `events` (an async iterator of JSON-able chunks), then `[DONE]`;
        a `COMIError` after the first event is sent as an `error` event."""
        started = time.perf_counter()

        async def lines():
            first = True
            try:
                async for chunk in events:
                    if first and "error" not in chunk:
                        metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                    yield f"data: {json.dumps(chunk)}\n\n"
            except COMIError as problem:
                if isinstance(problem, DecoderUnavailableError):
                    client.forget_connection()
                yield f"data: {refusal(problem, fields).body.decode()}\n\n"
            metrics.phases(total=time.perf_counter() - started)
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def prepared_stream(prepare, chunks, fields):
        """A stream whose request is checked before the response starts: a refusal is a plain error
        response (a 4xx status the client sees), not an event."""
        try:
            asked = await prepare()
        except COMIError as problem:
            if isinstance(problem, DecoderUnavailableError):
                client.forget_connection()
            return None, refusal(problem, fields)
        return asked, None

    async def decoded_events(asked: _Asked, embeds: list[torch.Tensor]):
        """`(question, sequence, text delta, finish reason)` as vLLM decodes, every question's
        sequences streamed at once; the deltas of one sequence joined are its answer."""
        queue: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()

        async def one(position: int, prompt: torch.Tensor):
            texts: dict[int, StreamedAnswer] = {}
            async for tokens in client.decoder.stream(prompt, asked.sampling):
                text = texts.setdefault(tokens.sequence, StreamedAnswer(client.tokenizer))
                delta = text.add(tokens.token_ids)
                metrics.count_tokens(generated=len(tokens.token_ids))
                if tokens.finish_reason is not None:
                    delta += text.finish()
                if delta or tokens.finish_reason is not None:
                    await queue.put((position, tokens.sequence, delta, tokens.finish_reason, len(text.token_ids)))

        async def all_of_them():
            try:
                await asyncio.gather(*(one(position, prompt) for position, prompt in enumerate(embeds)))
            finally:
                await queue.put(None)

        task = asyncio.create_task(all_of_them())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await task  # its exception, if any
            metrics.phases(decoding=time.perf_counter() - started)
        finally:
            task.cancel()

    # ------------------------------------------------------------------ COMI's API
    @app.post("/v1/answer")
    async def answer(request: Request, body: AnswerRequest):
        inputs = {"context": body.context}
        for name in ("question", "questions"):
            if getattr(body, name) is not None:
                inputs[name] = getattr(body, name)
        settings = {name: getattr(body, name) for name in SETTINGS if getattr(body, name) is not None}
        count = len(body.questions) if body.questions is not None else 1

        def prepare():
            return ask(inputs, body.merge_size, body.seed, settings, count)

        if body.stream:
            asked, refused = await prepared_stream(prepare, None, None)
            if refused is not None:
                return refused
            return stream(request, _answer_chunks(asked), None)

        async def work():
            asked = await prepare()
            embeds, completions = await answer_all(asked)
            (result,) = client.results(asked.questions, asked.spans, embeds, completions, body.return_token_ids)
            return JSONResponse(result)

        return await respond(request, work())

    async def _answer_chunks(asked: _Asked):
        """`/v1/answer`'s stream: text-completion chunks, choice `question * n + sequence`, then the
        COMI figures, in `pipeline("comi-qa")`'s words."""
        embeds = await compress(asked)
        identity = {"id": openai_api.response_id("completion"), "object": "text_completion"}
        identity.update(created=openai_api.created(), model=served_model_name)
        async for position, sequence, delta, finish, _ in decoded_events(asked, embeds):
            choice = {"index": position * asked.sampling.n + sequence, "text": delta, "finish_reason": finish}
            yield {**identity, "choices": [choice]}
        memory = [
            prompt.shape[0] - len(question.query_ids) for prompt, question in zip(embeds, asked.questions, strict=True)
        ]
        context_tokens = len(asked.questions[0].context_ids)
        yield {**identity, "choices": [], "comi": _figures(context_tokens, memory)}

    # ------------------------------------------------------------------ OpenAI's API
    @app.get("/v1/models")
    async def models():
        entry = {"id": served_model_name, "object": "model", "created": started_at, "owned_by": "comi_hf"}
        return {"object": "list", "data": [entry]}

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise _ModelNotFound(f"the model `{name}` does not exist here; this server serves `{served_model_name}`.")

    def openai_inputs(body: openai_api.OpenAIRequest, questions: list[str]) -> tuple[dict, dict]:
        check_model(body.model)
        body.refuse_what_comi_cannot_honour()
        context = openai_api.documents_context(body.documents)
        settings = openai_api.generation_settings(body)
        inputs = (
            {"context": context, "questions": questions}
            if len(questions) > 1
            else {"context": context, "question": questions[0]}
        )
        return inputs, settings

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: openai_api.ChatCompletionRequest):
        return await openai_endpoint(request, body, "chat", lambda: [openai_api.chat_question(body.messages)])

    @app.post("/v1/completions")
    async def completions(request: Request, body: openai_api.CompletionRequest):
        return await openai_endpoint(request, body, "completion", lambda: openai_api.completion_questions(body.prompt))

    async def openai_endpoint(request: Request, body, kind: str, questions_of):
        async def prepare():
            questions = questions_of()
            inputs, settings = openai_inputs(body, questions)
            return await ask(inputs, body.merge_size, body.seed, settings, len(questions))

        if body.stream:
            asked, refused = await prepared_stream(prepare, None, _OPENAI_FIELDS)
            if refused is not None:
                return refused
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(request, _openai_chunks(kind, asked, include_usage), _OPENAI_FIELDS)

        async def work():
            asked = await prepare()
            embeds, answers = await answer_all(asked)
            return JSONResponse(_openai_response(kind, asked, embeds, answers))

        return await respond(request, work(), _OPENAI_FIELDS)

    def _openai_response(kind: str, asked: _Asked, embeds, answers: list[list[Completion]]) -> dict:
        choices, generated = [], 0
        for position, sequences in enumerate(answers):
            for sequence, completion in enumerate(sequences):
                (text,) = decode_answers(client.tokenizer, [completion.token_ids])
                choice = {"index": position * asked.sampling.n + sequence, "finish_reason": completion.finish_reason}
                if kind == "chat":
                    choice.update(message={"role": "assistant", "content": text}, logprobs=None)
                else:
                    choice.update(text=text, logprobs=None)
                choices.append(choice)
                generated += len(completion.token_ids)
        return {
            "id": openai_api.response_id(kind),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": openai_api.created(),
            "model": served_model_name,
            "choices": choices,
            "usage": _usage(asked, generated),
            "comi": _figures(len(asked.questions[0].context_ids), _memory(asked, embeds)),
        }

    async def _openai_chunks(kind: str, asked: _Asked, include_usage: bool):
        embeds = await compress(asked)
        identity = {
            "id": openai_api.response_id(kind),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": openai_api.created(),
            "model": served_model_name,
        }
        n = asked.sampling.n
        if kind == "chat":  # OpenAI's first chunk names the role
            roles = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(len(embeds) * n)
            ]
            yield {**identity, "choices": roles}
        generated = 0
        async for position, sequence, delta, finish, tokens in decoded_events(asked, embeds):
            index = position * n + sequence
            if kind == "chat":
                choice = {"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta, "finish_reason": finish}
            if finish is not None:
                generated += tokens
            yield {**identity, "choices": [choice]}
        final = {
            **identity,
            "choices": [],
            "comi": _figures(len(asked.questions[0].context_ids), _memory(asked, embeds)),
        }
        if include_usage:
            final["usage"] = _usage(asked, generated)
        yield final

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health(request: Request):
        """Ready or not, for anyone; the decoder, the model and the cache with the API key."""
        try:
            connected = await client.connect()
            ready, problem = True, None
        except COMIError as error:
            client.forget_connection()
            ready, problem, connected = False, error, {}
            if isinstance(error, DecoderError):
                log.warning("health: %s [decoder %s: %s]", error, error.url, error.detail)
        content = {"status": "ok" if ready else "unavailable"}
        if authorized(request):
            decoder = {"reachable": ready, **connected}
            if problem is not None:
                decoder["error"] = str(problem)
            if isinstance(client.decoder, (VLLMServerDecoder, VLLMReplicas)):
                decoder["url"] = client.decoder.url
            content.update(decoder=decoder, cache=client.cache.stats(), model=served_model_name)
        return JSONResponse(status_code=200 if ready else 503, content=content)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _figures(context_tokens: int, memory: list[int]) -> dict:
        """COMI's figures: the context's tokens, each question's memory vectors, the compression."""
        ratios = [context_tokens / count for count in memory]
        if len(memory) == 1:
            return {"context_tokens": context_tokens, "memory_tokens": memory[0], "compression_ratio": ratios[0]}
        return {"context_tokens": context_tokens, "memory_tokens": memory, "compression_ratio": ratios}

    def _memory(asked: _Asked, embeds) -> list[int]:
        return [
            prompt.shape[0] - len(question.query_ids) for prompt, question in zip(embeds, asked.questions, strict=True)
        ]

    def _usage(asked: _Asked, generated: int) -> dict:
        """OpenAI's usage: the tokens sent (context and questions) and the tokens generated."""
        prompt = len(asked.questions[0].context_ids) + sum(len(question.query_ids) for question in asked.questions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    started_at = int(time.time())
    return app


class _Unauthorized(COMIError):
    status = 401
    code = "invalid_api_key"


class _ModelNotFound(COMIError):
    status = 404
    code = "model_not_found"

    def __init__(self, message: str):
        super().__init__(message, field="model")


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
            device=device,
            dtype=dtype,
            cache_bytes=args.cache_bytes,
            max_context_tokens=args.max_context_tokens,
        )
        api_key = args.api_key or os.environ.get(API_KEY_ENV)
        limits = Limits(args.max_questions, args.max_sequences, args.max_new_tokens, args.max_request_bytes)
        name = args.served_model_name or Path(args.model).name or args.model
        app = create_app(
            client,
            api_key=api_key,
            limits=limits,
            served_model_name=name,
            slice_questions=args.slice_questions,
            round_questions=args.round_questions,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
        server.run(sockets=[listener])
    finally:
        listener.close()
