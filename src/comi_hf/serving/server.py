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
import contextlib
import errno
import hmac
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors_comi import (
    COMIError,
    DecoderError,
    DecoderUnavailableError,
    ModelNotFoundError,
    UnauthorizedError,
    UsageError,
)
from ..loading import check_device
from . import openai_api
from .admission import DEFAULT_ROUND_QUESTIONS, DEFAULT_SLICE_QUESTIONS, BodyReader, Limits, unless_disconnected
from .client import COMIServingClient
from .decoder import VLLMReplicas, VLLMServerDecoder, check_url
from .service import COMIService

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


# OpenAI's names for what its API maps onto COMI's inputs and `generate`'s settings: a refusal
# names the field the client sent.
_OPENAI_FIELDS = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "stop_strings": "stop",
    "do_sample": "temperature",
    "context": "documents",
}
_QUESTION_FIELD = {"chat": "messages[0].content", "completion": "prompt"}
# The endpoints whose body is JSON whatever its Content-Type says.
_JSON_PATHS = ("/v1/answer", "/v1/chat/completions", "/v1/completions")


def create_app(
    client: COMIServingClient,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    served_model_name: str = "comi",
    slice_questions: int = DEFAULT_SLICE_QUESTIONS,
    round_questions: int = DEFAULT_ROUND_QUESTIONS,
):
    """The ASGI app of `comi-serve` around a [`COMIServingClient`] whose decoder is a vLLM server.

    `/v1/answer` (COMI's own API), `/v1/chat/completions`, `/v1/completions` and `/v1/models`
    (OpenAI's: `openai_api.py`), `/health`, `/metrics`. A request is checked against `limits`
    before any work, compressed in fair turns with the others, and decoded by vLLM
    (`service.COMIService`); with `api_key`, every endpoint but `/health` needs it.
    """
    service = COMIService(client, limits or Limits(), slice_questions, round_questions)
    log = logging.getLogger("comi_hf.serving")
    started_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.aclose()

    app = FastAPI(title="comi-serve", description="COMI question answering, the decoder on vLLM.", lifespan=lifespan)

    def refusal(problem: COMIError, fields: dict | None = None) -> JSONResponse:
        """The answer to a `COMIError`: its status, code and field decide, never its wording. The
        body is OpenAI's error shape, so that OpenAI clients raise their own typed exceptions."""
        if isinstance(problem, DecoderUnavailableError):
            client.forget_connection()  # checked again at the next request
        if isinstance(problem, DecoderError) and (problem.url or problem.detail):
            log.warning("%s [decoder %s: %s]", problem, problem.url, problem.detail)
        kind = "server_error" if problem.status >= 500 else "invalid_request_error"
        if problem.status == 401:
            kind = "authentication_error"
        field_name = (fields or {}).get(problem.field, problem.field)
        if fields and problem.field and problem.field.startswith("question"):  # question, questions[i]
            field_name = fields.get("question", field_name)
        body = {"message": str(problem), "type": kind, "param": field_name, "code": problem.code}
        return JSONResponse(status_code=problem.status, content={"error": body})

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())

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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """An unknown route, a method a route lacks, a body that cannot be parsed: the same error shape."""
        problem = COMIError(str(exc.detail))
        problem.status, problem.code = exc.status_code, "not_found" if exc.status_code == 404 else "invalid_request"
        return refusal(problem)

    app.add_middleware(BodyReader, max_bytes=service.limits.max_request_bytes, json_paths=_JSON_PATHS, refuse=refusal)

    # Outermost: a request without the key is refused before its body is read. A plain ASGI
    # middleware, not `@app.middleware("http")`, whose wrapping hides a client's disconnect from
    # the endpoints (they drop the work of a client that went away).
    app.add_middleware(Guard, allowed=authorized, refuse=refusal, observe=service.metrics.observe)

    async def respond(request: Request, prepare, shape, fields: dict | None = None) -> Response:
        """`shape(await prepare())`, dropped if the client goes away; a `COMIError` is refused."""
        started = time.perf_counter()

        async def work():
            asked = await prepare()
            embeds, answers = await service.answer(asked)
            return shape(embeds, answers, asked)

        try:
            content = await unless_disconnected(request.is_disconnected, work())
        except COMIError as problem:
            return refusal(problem, fields)
        if content is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        seconds = time.perf_counter() - started
        service.metrics.phases(total=seconds)
        return JSONResponse(content, headers={"X-Process-Time": f"{seconds:.4f}"})

    async def stream(prepare, chunks_of, fields: dict | None = None) -> Response:
        """Server-sent events: `chunks_of(asked)`'s chunks, then `data: [DONE]`. The request is
        checked before the response starts (a refusal is a plain error response); a `COMIError`
        later is sent as an `error` event. A client that goes away cancels the stream."""
        started = time.perf_counter()
        try:
            asked = await prepare()
        except COMIError as problem:
            return refusal(problem, fields)

        async def events():
            first = True
            try:
                async for chunk in chunks_of(asked):
                    if first and chunk["choices"]:
                        service.metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                    yield f"data: {json.dumps(chunk)}\n\n"
            except COMIError as problem:
                yield f"data: {refusal(problem, fields).body.decode()}\n\n"
            service.metrics.phases(total=time.perf_counter() - started)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
            return service.ask(inputs, body.merge_size, body.seed, settings, count)

        if body.stream:
            return await stream(
                prepare, lambda asked: openai_api.completion_chunks("completion", served_model_name, service, asked)
            )

        def shape(embeds, completions, asked):
            (result,) = client.results(asked.questions, asked.spans, embeds, completions, body.return_token_ids)
            return result

        return await respond(request, prepare, shape)

    # ------------------------------------------------------------------ OpenAI's API
    @app.get("/v1/models")
    async def models():
        entry = {"id": served_model_name, "object": "model", "created": started_at, "owned_by": "comi_hf"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: openai_api.ChatCompletionRequest):
        return await openai_endpoint(request, body, "chat", lambda: [openai_api.chat_question(body.messages)])

    @app.post("/v1/completions")
    async def completions(request: Request, body: openai_api.CompletionRequest):
        return await openai_endpoint(request, body, "completion", lambda: openai_api.completion_questions(body.prompt))

    async def openai_endpoint(request: Request, body: openai_api.OpenAIRequest, kind: str, questions_of):
        fields = {**_OPENAI_FIELDS, "question": _QUESTION_FIELD[kind]}

        async def prepare():
            if body.model != served_model_name:
                raise ModelNotFoundError(
                    f"the model `{body.model}` does not exist here; this server serves `{served_model_name}`.",
                    field="model",
                )
            body.refuse_what_comi_cannot_honour()
            questions = questions_of()
            inputs = {"context": openai_api.documents_context(body.documents)}
            inputs.update({"questions": questions} if len(questions) > 1 else {"question": questions[0]})
            settings = openai_api.generation_settings(body)
            return await service.ask(inputs, body.merge_size, body.seed, settings, len(questions))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunks(asked):
                return openai_api.completion_chunks(kind, served_model_name, service, asked, include_usage)

            return await stream(prepare, chunks, fields)

        def shape(embeds, answers, asked):
            figures = service.figures(asked, embeds)
            return openai_api.completion_response(kind, served_model_name, asked, figures, answers, client.tokenizer)

        return await respond(request, prepare, shape, fields)

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health(request: Request):
        """Ready or not, for anyone; the decoder, the model and the cache with the API key."""
        try:
            connected, problem = await client.connect(), None
        except COMIError as error:
            refusal(error)  # forgets the connection, logs what the decoder said
            connected, problem = {}, error
        content = {"status": "ok" if problem is None else "unavailable"}
        if authorized(request):
            decoder = {"reachable": problem is None, **connected}
            if problem is not None:
                decoder["error"] = str(problem)
            if isinstance(client.decoder, (VLLMServerDecoder, VLLMReplicas)):
                decoder["url"] = client.decoder.url
            content.update(decoder=decoder, cache=client.cache.stats(), model=served_model_name)
        return JSONResponse(status_code=200 if problem is None else 503, content=content)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


class Guard:
    """ASGI middleware: every path but `/health` needs the API key (`allowed(request)`); each
    response's status is counted by endpoint (`observe(path, status)`)."""

    def __init__(self, app, allowed, refuse, observe):
        self.app = app
        self.allowed = allowed
        self.refuse = refuse
        self.observe = observe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.observe(path, message["status"])
            await send(message)

        if path != "/health" and not self.allowed(Request(scope)):
            response = self.refuse(UnauthorizedError("missing or wrong API key (send `Authorization: Bearer <key>`)"))
            return await response(scope, receive, counted)
        await self.app(scope, receive, counted)


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

    urls = [check_url(url, "--vllm-url") for url in args.vllm_url]
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
            vllm_max_in_flight=args.vllm_max_in_flight,
            vllm_priority=args.vllm_priority,
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
