"""Turn a raw completion request into a validated body dict, or raise ``ProxyError``.

Checks run cheapest first: declared size, content type, size while reading, UTF-8,
JSON, the OpenAI schema, the proxy's limits, the model name. The schemas allow extra
fields, so vLLM's own parameters pass through; what is returned is the body as the
client sent it, never re-serialized from the models.

The schemas check what the OpenAI API defines for the fields pd relies on, plus every
field the prefill leg drops or overrides (``max_tokens``, ``n``, ``stream``,
``stream_options``, ``min_tokens``, ``max_completion_tokens``): vLLM would reject
those only on the decode leg, and the prefill instance would hold the prompt's KV for
a decode that never comes. Everything else is vLLM's to check; the proxy relays the
prefill leg's 4xx unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect

from pd.proxy.errors import ProxyError

MIB = 1024 * 1024

# A JSON \u escape in the surrogate range; only then can a parsed string hold a lone
# surrogate, which cannot be re-encoded as UTF-8 for the upstream call.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class RequestLimits:
    served_model_name: str
    max_body_bytes: int = 32 * MIB
    max_n: int = 16
    max_model_len: int | None = None  # known from the config; None leaves it to vLLM


async def read_body(request: Request, endpoint: str, limits: RequestLimits) -> dict[str, Any]:
    """The validated body of a POST to ``/v1/{endpoint}``."""
    check_declared_length(request.headers.get("content-length"), limits.max_body_bytes)
    check_content_type(request.headers.get("content-type"))
    try:
        raw = await read_limited(request.stream(), limits.max_body_bytes)
    except ClientDisconnect:
        raise ProxyError(499, "client disconnected") from None
    return validate_body(raw, endpoint, limits)


def check_declared_length(value: str | None, limit: int) -> None:
    if value is None:
        return  # chunked: read_limited counts
    try:
        length = int(value)
    except ValueError:
        raise ProxyError(400, f"invalid Content-Length {value!r}") from None
    if length > limit:
        raise _too_large(limit)


def check_content_type(value: str | None) -> None:
    """JSON, or no Content-Type at all (read as JSON, as vLLM's server does)."""
    if value is None:
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return
    raise ProxyError(415, f"Content-Type must be application/json, got {value!r}")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Read a body of at most ``limit`` bytes; stop reading as soon as it is exceeded."""
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > limit:
            raise _too_large(limit)
        body += chunk
    return bytes(body)


def validate_body(raw: bytes, endpoint: str, limits: RequestLimits) -> dict[str, Any]:
    body = _parse_json(raw)
    schema = SCHEMAS[endpoint]
    try:
        schema.model_validate(body)
    except ValidationError as e:
        raise _schema_error(e) from None
    _check_rules(body, endpoint, limits)
    model = body["model"]
    if model != limits.served_model_name:
        raise ProxyError(
            404, f"The model `{model}` does not exist; this server serves "
            f"`{limits.served_model_name}`", "model",
        )  # fmt: skip
    return body


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProxyError(400, f"request body is not valid UTF-8: {e}") from None
    try:
        # Strict JSON only: NaN, Infinity and overflowing numbers cannot be sent upstream.
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProxyError(400, "request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, ours, or an over-long integer
        raise ProxyError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        _check_encodable(body)
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _check_encodable(body: dict[str, Any]) -> None:
    pending: list[Any] = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProxyError(
                    400, "request body is not valid UTF-8: a \\u escape encodes a lone surrogate"
                ) from None


def _check_rules(body: dict[str, Any], endpoint: str, limits: RequestLimits) -> None:
    """Checks across fields and against the proxy's limits (the types are right by now)."""
    if endpoint == "completions" and body.get("prompt") is None and not body.get("prompt_embeds"):
        raise ProxyError(400, "Missing required parameter: 'prompt'", "prompt")
    n = body.get("n")
    if n is not None and n > limits.max_n:
        raise _invalid("n", f"at most {limits.max_n} choices per request, got {n}")
    if body.get("stream_options") and not body.get("stream"):
        raise _invalid("stream_options", "only allowed when `stream` is true")
    # Chat: vLLM takes max_completion_tokens over max_tokens.
    field = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
    max_tokens = body.get(field)
    min_tokens = body.get("min_tokens")
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise _invalid("min_tokens", f"{min_tokens} is greater than {field}={max_tokens}")
    max_model_len = limits.max_model_len
    if max_model_len is not None and max_tokens is not None and max_tokens > max_model_len:
        raise _invalid(field, f"{max_tokens} is greater than the context length {max_model_len}")


def _invalid(param: str, problem: str) -> ProxyError:
    return ProxyError(400, f"Invalid parameter '{param}': {problem}", param)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"request body is larger than {limit} bytes")


def _schema_error(error: ValidationError) -> ProxyError:
    """The first problem, with its field as OpenAI names it: ``messages[0].role``."""
    item = error.errors(include_url=False)[0]
    param = ""
    for part in item["loc"]:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    if item["type"] == "missing":
        return ProxyError(400, f"Missing required parameter: '{param}'", param)
    return _invalid(param, item["msg"].removeprefix("Value error, "))


# --- the schemas -----------------------------------------------------------------

PositiveInt = Annotated[int, Field(ge=1)]


class _Body(BaseModel):
    """Fields both endpoints share. Strict: JSON ``"16"`` is not the integer 16."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: PositiveInt | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    n: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: Any = None
    """A string, strings, token ids or lists of token ids; optional with prompt_embeds."""

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if value is None or _is_prompt(value):
            return value
        raise ValueError(
            "must be a non-empty string, list of strings, list of token ids or list of "
            "token-id lists"
        )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: Any = None

    @field_validator("content", mode="plain")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(part, dict) for part in value):
            return value
        raise ValueError("must be a string, a list of content parts (objects) or null")


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


SCHEMAS: dict[str, type[_Body]] = {"completions": CompletionBody, "chat/completions": ChatBody}


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return value != ""
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(p, str) for p in value) or _is_token_ids(value):
        return True
    return all(isinstance(p, list) and p and _is_token_ids(p) for p in value)


def _is_token_ids(value: list[Any]) -> bool:
    return all(type(t) is int and t >= 0 for t in value)
