"""The scenarios' client: send one request to pd (or a vLLM server) and classify how it ended.

Every request a scenario sends ends in exactly one outcome:

  completed  HTTP 200 and a well-formed answer of the requested length: JSON with
             ``usage.completion_tokens == max_tokens``, or a stream in which every
             event parses, the usage chunk says ``max_tokens`` and ``data: [DONE]``
             comes last
  error      a clear error: an HTTP error status with an OpenAI error body
             (``{"error": {"message": ...}}``), or a stream whose events all parse and
             whose last event (before an optional ``[DONE]``) is such an error object
  lost       anything else: a connection dropped without an answer, a malformed or
             truncated body or stream, a 200 of the wrong length
  hung       no end within the client's deadline (the request is abandoned)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

SERVED = "pd-tiny"  # configs/local.yaml's served model name


@dataclass
class Outcome:
    kind: str  # completed | error | lost | hung
    status: int | None
    elapsed_s: float
    detail: str = ""
    events: int = 0  # stream events received (a stream's progress)
    answer: Any = None  # a completed non-streamed answer, parsed


def completion_body(
    prompt_chars: int = 200,
    max_tokens: int = 16,
    stream: bool = False,
    chat: bool = False,
    salt: int | None = None,
) -> dict[str, Any]:
    """A request of a known answer length (ignore_eos): the tiny model's tokenizer is
    byte-level, so ``prompt_chars`` ASCII characters are that many prompt tokens."""
    salt = random.randrange(10**9) if salt is None else salt
    words = f"{salt} prefill decode cache transfer lease block "
    text = (words * (prompt_chars // len(words) + 1))[:prompt_chars]
    body: dict[str, Any] = {
        "model": SERVED,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def endpoint_of(body: dict[str, Any]) -> str:
    return "chat/completions" if "messages" in body else "completions"


async def send(
    http: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    deadline_s: float,
    on_event: Callable[[], None] | None = None,
) -> Outcome:
    """POST ``body`` and classify how it ended; abandon it after ``deadline_s``.

    ``on_event()`` is called as events arrive (in every read that completes one)."""
    started = time.monotonic()
    progress = {"events": 0}
    try:
        outcome = await asyncio.wait_for(
            _send(http, f"{base_url}/v1/{endpoint_of(body)}", body, progress, on_event),
            deadline_s,
        )
    except TimeoutError:
        return Outcome(
            "hung",
            None,
            time.monotonic() - started,
            f"no end within {deadline_s:.0f}s",
            progress["events"],
        )
    outcome.elapsed_s = time.monotonic() - started
    return outcome


async def _send(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    progress: dict[str, int],
    on_event: Callable[[], None] | None,
) -> Outcome:
    try:
        async with http.stream("POST", url, json=body) as response:
            raw = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    # Event ends in this chunk (one may straddle the previous chunk).
                    ended = raw.count(b"\n\n", max(0, len(raw) - len(chunk) - 1))
                    if ended:
                        progress["events"] += ended
                        if on_event is not None:
                            on_event()
            except httpx.HTTPError as e:
                return Outcome(
                    "lost",
                    response.status_code,
                    0,
                    f"connection broke after {len(raw)} bytes: {e!r}",
                    progress["events"],
                )
    except httpx.HTTPError as e:
        return Outcome("lost", None, 0, f"no answer: {e!r}")
    status = response.status_code
    if status != 200:
        if _openai_error(_json(bytes(raw))):
            return Outcome("error", status, 0, bytes(raw[:300]).decode(errors="replace"))
        return Outcome("lost", status, 0, f"error without an OpenAI body: {bytes(raw[:300])!r}")
    if body.get("stream"):
        return _classify_stream(bytes(raw), body["max_tokens"], progress["events"])
    answer = _json(bytes(raw))
    if not isinstance(answer, dict) or not answer.get("choices"):
        return Outcome("lost", status, 0, f"malformed answer: {bytes(raw[:300])!r}")
    tokens = (answer.get("usage") or {}).get("completion_tokens")
    if tokens != body["max_tokens"]:
        return Outcome("lost", status, 0, f"{tokens} tokens, asked for {body['max_tokens']}")
    return Outcome("completed", status, 0, answer=answer)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _openai_error(obj: Any) -> bool:
    error = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _classify_stream(raw: bytes, max_tokens: int, events: int) -> Outcome:
    def lost(why: str) -> Outcome:
        return Outcome("lost", 200, 0, why, events)

    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return lost("stream is not UTF-8")
    *blocks, tail = text.split("\n\n")
    if tail.strip():
        return lost(f"stream ends inside an event: {tail[-200:]!r}")
    payloads = []
    for block in blocks:
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines or not all(line.startswith("data: ") for line in lines):
            return lost(f"malformed event: {block[:200]!r}")
        payloads.append("\n".join(line[len("data: ") :] for line in lines))
    done = bool(payloads) and payloads[-1] == "[DONE]"
    if done:
        payloads.pop()
    parsed = []
    for payload in payloads:
        obj = _json(payload.encode())
        if not isinstance(obj, dict):
            return lost(f"event is not a JSON object: {payload[:200]!r}")
        parsed.append(obj)
    errors = [i for i, obj in enumerate(parsed) if _openai_error(obj)]
    if errors:
        if errors != [len(parsed) - 1]:
            return lost("an error event is not the stream's last event")
        return Outcome("error", 200, 0, json.dumps(parsed[-1])[:300], events)
    if not done:
        return lost(f"stream ends after {len(parsed)} events without [DONE] or an error")
    usage = next((o["usage"] for o in reversed(parsed) if o.get("usage")), None)
    if not usage or usage.get("completion_tokens") != max_tokens:
        return lost(f"stream usage {usage}, asked for {max_tokens} tokens")
    if not any(o.get("choices") for o in parsed):
        return lost("stream without choices")
    return Outcome("completed", 200, 0, events=events)


def http_client() -> httpx.AsyncClient:
    """Deadlines come from ``send``; the client itself never gives up."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)
