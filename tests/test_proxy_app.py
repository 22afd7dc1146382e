"""The proxy app in front of instances that point at nothing (no engines).

Every instance is unhealthy, so a request that passes the proxy's own checks ends in
503 "no instance": a 401, 4xx or 413 instead proves the check ran before routing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from pd.proxy.app import ProxySettings, create_app
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.routing import make_policy

KEY = "s3cret-key"
BODY = {"model": "pd-tiny", "prompt": "Hello", "max_tokens": 4}


def make_app(**settings: Any):
    http = httpx.AsyncClient()
    # Port 9 (discard) on loopback: nothing answers there.
    dead = [Instance("pd-prefill-0", "prefill", "http://127.0.0.1:9"),
            Instance("pd-decode-0", "decode", "http://127.0.0.1:9")]  # fmt: skip
    pool = InstancePool(dead, http)
    policy = make_policy("round_robin")
    return create_app(pool, policy, ProxySettings(served_model_name="pd-tiny", **settings), http)


def call(app, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    return error


def test_api_key_is_checked_before_routing():
    app = make_app(api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):  # fmt: skip
        response = call(app, "POST", "/v1/completions", json=BODY, headers=headers)
        error = assert_openai_error(response, 401)
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/v1/unknown"):
        assert_openai_error(call(app, "GET", path), 401)
    ok = {"Authorization": f"Bearer {KEY}"}
    assert_openai_error(call(app, "POST", "/v1/completions", json=BODY, headers=ok), 503)
    assert_openai_error(call(app, "GET", "/v1/models", headers=ok), 503)
    assert_openai_error(call(app, "GET", "/v1/unknown", headers=ok), 404)


def test_health_and_metrics_stay_open():
    app = make_app(api_key=KEY)
    assert call(app, "GET", "/health").status_code == 503  # open, and nothing is healthy
    assert call(app, "GET", "/metrics").status_code == 200


def test_health_with_decode_alone_is_degraded_but_serving():
    app = make_app()
    for inst in app.state.pool.instances.values():
        inst.healthy = inst.role == "decode"
    health = call(app, "GET", "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "degraded", "prefill": 0, "decode": 1}


def test_no_key_configured_means_open():
    app = make_app()
    assert_openai_error(call(app, "POST", "/v1/completions", json=BODY), 503)


def test_official_client_sends_the_key_as_bearer():
    app = make_app(api_key=KEY)

    async def ask(key: str) -> None:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        client = openai.AsyncOpenAI(
            base_url="http://proxy/v1", api_key=key, http_client=http, max_retries=0
        )
        async with client:
            await client.completions.create(model="pd-tiny", prompt="Hi", max_tokens=4)

    with pytest.raises(openai.AuthenticationError):
        asyncio.run(ask("wrong"))
    with pytest.raises(openai.InternalServerError) as info:  # past auth: no instance
        asyncio.run(ask(KEY))
    assert info.value.status_code == 503


def test_body_limit_from_content_length():
    app = make_app(max_body_bytes=2048)
    body = b'{"model": "pd-tiny", "prompt": "' + b"x" * 4096 + b'"}'
    headers = {"Content-Type": "application/json"}
    response = call(app, "POST", "/v1/completions", content=body, headers=headers)
    assert "content-length" in {k.lower() for k in response.request.headers}
    assert_openai_error(response, 413)


def test_body_limit_while_reading_a_chunked_body():
    app = make_app(max_body_bytes=2048)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "pd-tiny", "prompt": "'
        while sent < 10 * 1024 * 1024:  # a bound only so a broken proxy fails, not hangs
            sent += 512
            yield b"x" * 512

    response = call(app, "POST", "/v1/completions", content=endless(),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(response, 413)
    assert sent <= 2048 + 512  # the proxy stopped reading at the limit


def test_wrong_content_type_is_415():
    app = make_app()
    response = call(app, "POST", "/v1/completions", data={"model": "pd-tiny"})
    assert_openai_error(response, 415)


def test_unknown_path_and_wrong_method():
    app = make_app()
    error = assert_openai_error(call(app, "POST", "/v1/nothing", json=BODY), 404)
    assert "/v1/nothing" in error["message"]
    assert_openai_error(call(app, "GET", "/nothing"), 404)
    response = call(app, "GET", "/v1/completions")
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert_openai_error(call(app, "DELETE", "/v1/models"), 405)


def test_bad_body_is_400_before_routing():
    app = make_app()
    response = call(app, "POST", "/v1/chat/completions", json={"model": "pd-tiny", "messages": []})
    assert assert_openai_error(response, 400)["param"] == "messages"
    response = call(app, "POST", "/v1/completions", json={**BODY, "model": "gpt-9"})
    assert assert_openai_error(response, 404)["param"] == "model"


@pytest.mark.parametrize("model", ["tiny", "missing"])
def test_the_proxy_serves_only_once_its_tokenizer_settled(model: str, tmp_path):
    # Loading imports transformers, seconds of CPU: never while requests run. A
    # tokenizer that cannot load is settled too (reported; the flows do without it).
    from pd.models import make_model

    folder = str(make_model("tiny")) if model == "tiny" else str(tmp_path / "no-model")
    app = make_app(tokenizer=folder)

    async def go() -> None:
        async with app.router.lifespan_context(app):
            assert app.state.tokenizer.settled
            assert (app.state.tokenizer._tokenizer is not None) == (model == "tiny")

    asyncio.run(asyncio.wait_for(go(), 60))
