"""The errors comi_hf raises: one family, each carrying what a caller needs to act on it.

Every problem comi_hf reports about its inputs, its models or the services it talks to is a
[`COMIError`] (a `ValueError`): bad input, a setting that cannot be honoured, a context too
long, a model that does not load, a decoder that refused or cannot be reached, a result that is
not finite. Callers branch on the class or on the attributes, never on the message text:

* `status`: the HTTP status `comi-serve` answers with (400 bad input, 413 too long, 502/503
  decoder, 500 a model or result that is broken);
* `code`: a short machine-readable name, sent as the `code` of an HTTP error;
* `field`: the input, argument or setting at fault (`"context"`, `"merge_size"`, ...), when one is.

This file is shipped as remote code beside saved models, so it imports nothing but the standard
library.
"""

from __future__ import annotations

__all__ = [
    "COMIError",
    "ContextTooLongError",
    "DecoderError",
    "DecoderRefusedError",
    "DecoderUnavailableError",
    "InvalidInputError",
    "MalformedDataError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NonFiniteError",
    "UnauthorizedError",
    "UnsupportedSettingError",
    "UsageError",
    "describe_value",
]


class COMIError(ValueError):
    """Base of every error comi_hf raises about inputs, models and services.

    Args:
        message: what is wrong, in one line, naming the value at fault.
        field: the input, argument or setting at fault, if one is.
    """

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidInputError(COMIError, TypeError):
    """A context, question, token ids, mask or argument that is malformed, of the wrong type,
    empty, or outside the model's vocabulary. (Also a `TypeError`, which a wrong type was before.)"""

    code = "invalid_input"


class UnsupportedSettingError(InvalidInputError):
    """A generation setting that cannot be honoured where it was asked for (e.g. beam search on vLLM)."""

    code = "unsupported_setting"


class ContextTooLongError(InvalidInputError):
    """A context longer than a limit: a server's `max_context_tokens`, or more decoder positions
    than the model has."""

    status = 413
    code = "context_too_long"


class UsageError(InvalidInputError):
    """A problem with a command's input that is not a tensor: a missing or unreadable file, an
    output path that cannot be written, a device this machine lacks."""

    code = "usage"


class UnauthorizedError(COMIError):
    """A request to `comi-serve` without its API key, or with a wrong one."""

    status = 401
    code = "invalid_api_key"


class ModelNotFoundError(COMIError):
    """A request for a model the server does not serve (OpenAI's API names the model)."""

    status = 404
    code = "model_not_found"


class MalformedDataError(InvalidInputError):
    """A data file (COMI JSONL) that does not follow the format; the message names file, line and field."""

    code = "malformed_data"


class ModelLoadError(COMIError):
    """A model that does not load: not a COMI model, missing or leftover weights, non-finite
    weights, a checkpoint that does not match its backbone, a missing tokenizer."""

    status = 500
    code = "model_error"


class NonFiniteError(COMIError):
    """NaN or inf where a finite number is needed: hidden states, query vectors, logits.

    Attributes:
        rows: the indices of the rows (queries, samples) at fault, in order.
    """

    status = 500
    code = "non_finite"

    def __init__(self, message: str, rows: list[int] | None = None, *, field: str | None = None):
        super().__init__(message, field=field)
        self.rows = list(rows or [])


class DecoderError(COMIError):
    """The decoder (a vLLM server) refused a request or answered with an error.

    The message names the problem, never the server's address; `url` (the server) and `detail`
    (what it said that may name internal paths) are for logs.
    """

    status = 502
    code = "decoder_error"

    def __init__(self, message: str, *, url: str | None = None, detail: str | None = None, field: str | None = None):
        super().__init__(message, field=field)
        self.url = url
        self.detail = detail


class DecoderUnavailableError(DecoderError):
    """The decoder cannot be reached, or is not ready."""

    status = 503
    code = "decoder_unavailable"


class DecoderRefusedError(DecoderError):
    """The decoder refused a request as malformed (it answered 4xx): the request's problem."""

    status = 400
    code = "decoder_refused"


def describe_value(value: object) -> str:
    """What a wrong argument was, for an error message: `a torch.float32 tensor of shape (2, 3)`."""
    if type(value).__name__ == "Tensor" and hasattr(value, "dtype"):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        shown = ", ".join(describe_value(item) for item in value[:4])
        more = f", ... ({len(value)} items)" if len(value) > 4 else ""
        return f"a {type(value).__name__} of {shown}{more}" if value else f"an empty {type(value).__name__}"
    if isinstance(value, (bool, int, float)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    return f"a {type(value).__name__}"
