"""OpenAI's API on `comi-serve`: `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

A COMI request is documents and a question. OpenAI clients send them as:

* the documents: `documents`, a list of strings or of `{"text", "title"?}` objects (the field vLLM's
  chat API and transformers' chat templates use for RAG), through the client's `extra_body`. They
  are joined in order into the one context `generate` reads: each document's text, after its
  title and a newline when it has one, the documents separated by a blank line (`"\\n\\n"`);
* the question: the chat's one user message (a string, or text content parts joined without a
  separator), or the completion's `prompt` (a string; a list of strings asks several questions
  about the same documents, answered as consecutive choices);
* COMI's own setting `merge_size`, also through `extra_body`.

OpenAI's sampling fields map onto `generate`'s: `max_tokens` / `max_completion_tokens` →
`max_new_tokens`; `temperature` (0, the default here as in vLLM, is greedy decoding; above 0
samples); `top_p`; `n` → `num_return_sequences`; `stop` → `stop_strings`; `seed`. What COMI cannot
honour is refused with a 400 naming the field: system, developer, assistant and tool messages
(COMI's decoder reads `[memory ; question]`, nothing else: put instructions in the question),
several user messages, tools and function calls, logprobs, non-text content and response
formats, penalties and logit biases. Answers carry OpenAI's fields and COMI's figures in `comi`:
`{"context_tokens", "memory_tokens", "compression_ratio"}`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors_comi import InvalidInputError
from ..processing_comi import decode_answers

if TYPE_CHECKING:
    from .decoder import Completion
    from .service import Asked, COMIService

Kind = Literal["chat", "completion"]

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "completion_chunks",
    "completion_response",
    "Document",
    "OpenAIRequest",
    "chat_question",
    "completion_questions",
    "documents_context",
    "generation_settings",
]


class Document(BaseModel):
    """A document of `documents`: its text and, optionally, its title."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str
    title: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


# Fields OpenAI defines that COMI cannot honour: refused when set to anything but their no-op value.
_REFUSED = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": None,
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
}


class OpenAIRequest(BaseModel):
    """What chat and completion requests share: the model, the documents, the sampling fields."""

    # Lax on purpose, unlike `/v1/answer`: OpenAI clients send `temperature: 1` and `top_p: 1` as
    # integers. Unknown fields are kept so that each is refused by name, not dropped.
    model_config = ConfigDict(extra="allow")
    model: str
    documents: list[str | Document] | None = None
    merge_size: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="An end user's id: recorded in the log, no other effect.")

    def refuse_what_comi_cannot_honour(self) -> None:
        for name, value in (self.model_extra or {}).items():
            allowed = _REFUSED.get(name, ())
            if name not in _REFUSED or allowed is None or value not in allowed:
                reason = "is not a field of this API" if name not in _REFUSED else "cannot be honoured by COMI"
                raise InvalidInputError(f"`{name}` {reason} (docs/serving.md, OpenAI API).", field=name)


class ChatCompletionRequest(OpenAIRequest):
    """The body of `POST /v1/chat/completions`."""

    messages: list[dict[str, Any]]


class CompletionRequest(OpenAIRequest):
    """The body of `POST /v1/completions`."""

    prompt: str | list[str]


def documents_context(documents: list[str | Document] | None) -> str:
    """The context `generate` reads: the documents in order, each after its title and a newline
    when it has one, separated by a blank line."""
    if not documents:
        raise InvalidInputError(
            "no `documents`: COMI answers questions about documents; send them as `documents` (a list of strings or "
            'of {"text", "title"} objects), with the openai client through `extra_body`.',
            field="documents",
        )
    texts = []
    for document in documents:
        if isinstance(document, Document):
            texts.append(f"{document.title}\n{document.text}" if document.title else document.text)
        else:
            texts.append(document)
    return "\n\n".join(texts)


def chat_question(messages: list[dict[str, Any]]) -> str:
    """The question of a chat: its one user message's text."""
    if not messages:
        raise InvalidInputError("`messages` is empty: send the question as one user message.", field="messages")
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role != "user":
            raise InvalidInputError(
                f"`messages[{position}]` has the role {role!r}: COMI answers one user message about the documents "
                "(its decoder reads the compressed documents and the question, nothing else; put instructions in the "
                "question).",
                field=f"messages[{position}]",
            )
    if len(messages) > 1:
        raise InvalidInputError(
            f"`messages` holds {len(messages)} user messages: COMI answers one question, with no conversation "
            "history; send one user message.",
            field="messages",
        )
    content = messages[0].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidInputError(
                    f"`messages[0].content` holds a {kind!r} part: COMI reads text only.", field="messages[0].content"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidInputError(
        "`messages[0].content` must be a string or a list of text parts.", field="messages[0].content"
    )


def completion_questions(prompt: str | list[str]) -> list[str]:
    """The questions of a completion: its prompt, or each of its prompts."""
    questions = [prompt] if isinstance(prompt, str) else list(prompt)
    if not questions:
        raise InvalidInputError("`prompt` is an empty list: send the question.", field="prompt")
    return questions


def generation_settings(request: OpenAIRequest) -> dict:
    """OpenAI's sampling fields as `generate`'s settings (temperature 0 or unset: greedy)."""
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise InvalidInputError(
            "give one of `max_tokens` and `max_completion_tokens`, not both.", field="max_completion_tokens"
        )
    settings: dict[str, Any] = {}
    new_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if new_tokens is not None:
        settings["max_new_tokens"] = new_tokens
    sampling = bool(request.temperature)
    settings["do_sample"] = sampling
    if sampling:
        settings["temperature"] = request.temperature
        if request.top_p is not None:
            settings["top_p"] = request.top_p
    elif request.top_p is not None and request.top_p != 1:
        raise InvalidInputError("`top_p` needs sampling: set a `temperature` above 0.", field="top_p")
    if request.n != 1:
        settings["num_return_sequences"] = request.n
    if request.stop:
        settings["stop_strings"] = [request.stop] if isinstance(request.stop, str) else request.stop
    return settings


def usage(asked: Asked, generated: int) -> dict:
    """OpenAI's usage: the tokens sent (context and questions) and the tokens generated."""
    prompt = asked.context_tokens + sum(len(question.query_ids) for question in asked.questions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _identity(kind: Kind, model: str, chunk: bool) -> dict:
    objects = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}
    return {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        "object": objects.get((kind, chunk), "text_completion"),
        "created": int(time.time()),
        "model": model,
    }


def completion_response(
    kind: Kind, model: str, asked: Asked, figures: dict, answers: list[list[Completion]], tokenizer
) -> dict:
    """A chat completion or a completion: choice `question * n + sequence`, COMI's figures in `comi`."""
    choices, generated = [], 0
    for position, sequences in enumerate(answers):
        for sequence, completion in enumerate(sequences):
            (text,) = decode_answers(tokenizer, [completion.token_ids])
            choice = {"index": position * asked.sampling.n + sequence, "finish_reason": completion.finish_reason}
            if kind == "chat":
                choice.update(message={"role": "assistant", "content": text}, logprobs=None)
            else:
                choice.update(text=text, logprobs=None)
            choices.append(choice)
            generated += len(completion.token_ids)
    return {**_identity(kind, model, False), "choices": choices, "usage": usage(asked, generated), "comi": figures}


async def completion_chunks(
    kind: Kind, model: str, service: COMIService, asked: Asked, include_usage: bool = False
) -> AsyncIterator[dict]:
    """A streamed chat completion or completion (`/v1/answer`'s stream too): OpenAI's chunks as vLLM
    decodes, then one with COMI's figures (and `usage`, if asked for)."""
    embeds = await service.compress(asked)
    identity = _identity(kind, model, True)
    n = asked.sampling.n
    if kind == "chat":  # OpenAI's first chunk names the role
        roles = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(len(embeds) * n)
        ]
        yield {**identity, "choices": roles}
    generated = 0
    async for decoded in service.stream(asked, embeds):
        index = decoded.question * n + decoded.sequence
        if kind == "chat":
            delta = {"content": decoded.text} if decoded.text else {}
            choice = {"index": index, "delta": delta, "finish_reason": decoded.finish_reason}
        else:
            choice = {"index": index, "text": decoded.text, "finish_reason": decoded.finish_reason}
        if decoded.finish_reason is not None:
            generated += decoded.tokens
        yield {**identity, "choices": [choice]}
    final = {**identity, "choices": [], "comi": service.figures(asked, embeds)}
    if include_usage:
        final["usage"] = usage(asked, generated)
    yield final
