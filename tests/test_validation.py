"""pd.proxy.validation: every bad body is a ProxyError naming the problem (no engines)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pd.proxy.errors import ProxyError
from pd.proxy.validation import (
    RequestLimits,
    check_content_type,
    check_declared_length,
    read_limited,
    validate_body,
)

LIMITS = RequestLimits("pd-tiny", max_body_bytes=1000, max_n=4, max_model_len=2048)
COMPLETION = {"model": "pd-tiny", "prompt": "Hello", "max_tokens": 8}
CHAT = {"model": "pd-tiny", "messages": [{"role": "user", "content": "Hi"}]}


def completion(**changes: Any) -> bytes:
    return json.dumps({**COMPLETION, **changes}).encode()


def chat(**changes: Any) -> bytes:
    return json.dumps({**CHAT, **changes}).encode()


def without(body: dict[str, Any], key: str) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != key}).encode()


def rejected(raw: bytes, endpoint: str = "completions", limits: RequestLimits = LIMITS):
    with pytest.raises(ProxyError) as info:
        validate_body(raw, endpoint, limits)
    return info.value


def test_valid_bodies_pass_through_unchanged():
    extra = {"ignore_eos": True, "return_token_ids": True, "kv_transfer_params": {"x": 1}}
    body = {**COMPLETION, **extra, "stream": True, "stream_options": {"include_usage": True}}
    assert validate_body(json.dumps(body).encode(), "completions", LIMITS) == body
    for prompt in ("x", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert validate_body(completion(prompt=prompt), "completions", LIMITS)["prompt"] == prompt
    parts = [{"type": "text", "text": "Hi"}]
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": parts},
                {"role": "assistant", "content": None, "tool_calls": []}]  # fmt: skip
    validated = validate_body(chat(messages=messages), "chat/completions", LIMITS)
    assert validated["messages"] == messages
    # Edges that are valid: ints for floats, the range ends, null for optional fields.
    ok = completion(temperature=2, top_p=1, n=4, max_tokens=2048, min_tokens=8, seed=None)
    validate_body(ok, "completions", LIMITS)
    validate_body(completion(prompt=None, prompt_embeds="AAAA"), "completions", LIMITS)


# (raw body, endpoint, status, param)
BAD_BODIES = [
    (b'{"model": "pd-tiny", "prompt": ', "completions", 400, None),
    (b"[1, 2]", "completions", 400, None),
    (b"", "completions", 400, None),
    (b'{"model": "pd-tiny", "prompt": "\xff\xfe"}', "completions", 400, None),
    (b'{"model": "pd-tiny", "prompt": "\\ud800"}', "completions", 400, None),
    (b'{"model": "pd-tiny", "prompt": "x", "temperature": NaN}', "completions", 400, None),
    (b'{"model": "pd-tiny", "prompt": "x", "foo": 1e999}', "completions", 400, None),
    (b'{"model": "pd-tiny", "prompt": "x", "foo": ' + b"9" * 5000 + b"}",
     "completions", 400, None),
    (b"[" * 100_000 + b"]" * 100_000, "completions", 400, None),
    (without(COMPLETION, "model"), "completions", 400, "model"),
    (without(COMPLETION, "prompt"), "completions", 400, "prompt"),
    (without(CHAT, "messages"), "chat/completions", 400, "messages"),
    (without(CHAT, "model"), "chat/completions", 400, "model"),
    (completion(model=7), "completions", 400, "model"),
    (completion(prompt=5), "completions", 400, "prompt"),
    (completion(prompt=""), "completions", 400, "prompt"),
    (completion(prompt=[]), "completions", 400, "prompt"),
    (completion(prompt=[1, "a"]), "completions", 400, "prompt"),
    (completion(prompt=[-1]), "completions", 400, "prompt"),
    (completion(prompt=[True]), "completions", 400, "prompt"),
    (completion(max_tokens="16"), "completions", 400, "max_tokens"),
    (completion(max_tokens=1.5), "completions", 400, "max_tokens"),
    (completion(max_tokens=True), "completions", 400, "max_tokens"),
    (completion(max_tokens=0), "completions", 400, "max_tokens"),
    (completion(max_tokens=-3), "completions", 400, "max_tokens"),
    (completion(max_tokens=2049), "completions", 400, "max_tokens"),
    (completion(min_tokens=9), "completions", 400, "min_tokens"),
    (completion(min_tokens=-1), "completions", 400, "min_tokens"),
    (completion(stream="yes"), "completions", 400, "stream"),
    (completion(stream_options={"include_usage": True}), "completions", 400,
     "stream_options"),
    (completion(n=5), "completions", 400, "n"),
    (completion(n=0), "completions", 400, "n"),
    (completion(n="2"), "completions", 400, "n"),
    (completion(temperature=-0.1), "completions", 400, "temperature"),
    (completion(temperature=2.5), "completions", 400, "temperature"),
    (completion(temperature="hot"), "completions", 400, "temperature"),
    (completion(top_p=0), "completions", 400, "top_p"),
    (completion(top_p=1.01), "completions", 400, "top_p"),
    (chat(messages=[]), "chat/completions", 400, "messages"),
    (chat(messages="Hi"), "chat/completions", 400, "messages"),
    (chat(messages=["Hi"]), "chat/completions", 400, "messages[0]"),
    (chat(messages=[{"content": "Hi"}]), "chat/completions", 400, "messages[0].role"),
    (chat(messages=[{"role": "user", "content": 3}]), "chat/completions", 400,
     "messages[0].content"),
    (chat(max_completion_tokens=0), "chat/completions", 400, "max_completion_tokens"),
    (chat(max_completion_tokens=4096), "chat/completions", 400, "max_completion_tokens"),
    (chat(max_tokens=4, min_tokens=5), "chat/completions", 400, "min_tokens"),
    (completion(model="gpt-9"), "completions", 404, "model"),
    (chat(model="gpt-9"), "chat/completions", 404, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "endpoint", "status", "param"), BAD_BODIES)
def test_bad_bodies(raw, endpoint, status, param):
    error = rejected(raw, endpoint)
    assert (error.status, error.param) == (status, param), error.message
    assert error.message


def test_messages_name_the_problem():
    assert rejected(without(COMPLETION, "model")).message == "Missing required parameter: 'model'"
    error = rejected(completion(max_tokens=0))
    assert error.message.startswith("Invalid parameter 'max_tokens': ")
    assert "UTF-8" in rejected(b'{"prompt": "\xff"}').message


def test_max_model_len_unknown_leaves_it_to_vllm():
    limits = RequestLimits("pd-tiny")
    assert validate_body(completion(max_tokens=10**6), "completions", limits)
    assert rejected(completion(n=17), limits=limits).param == "n"  # default max_n is 16


@pytest.mark.parametrize(
    "value", [None, "application/json", "application/json; charset=utf-8", "Application/JSON",
              "application/vnd.api+json"],
)  # fmt: skip
def test_json_content_types_pass(value):
    check_content_type(value)


@pytest.mark.parametrize(
    "value", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
def test_other_content_types_are_415(value):
    with pytest.raises(ProxyError) as info:
        check_content_type(value)
    assert info.value.status == 415


def test_declared_length():
    check_declared_length(None, 10)
    check_declared_length("10", 10)
    with pytest.raises(ProxyError) as info:
        check_declared_length("11", 10)
    assert info.value.status == 413
    with pytest.raises(ProxyError) as info:
        check_declared_length("ten", 10)
    assert info.value.status == 400


def test_read_limited_stops_at_the_limit():
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 100

    with pytest.raises(ProxyError) as info:
        asyncio.run(read_limited(endless(), 1000))
    assert info.value.status == 413
    assert pulled == 11  # the chunk that crossed the limit is the last one read

    async def exactly(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"y" * 100

    assert asyncio.run(read_limited(exactly(10), 1000)) == b"y" * 1000
