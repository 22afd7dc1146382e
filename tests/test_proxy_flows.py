"""The proxy's flows (pd.proxy.flow, pd.proxy.first_token) end to end, without engines.

The real app is served by uvicorn on loopback and called by a real HTTP client; its
upstream calls go to fake vLLM instances (tests/harness/fake_upstream.py) that record
every body they get and whether the proxy aborted the call. Health is driven by the
test: an instance leaves rotation when its /health fails and the pool checks it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from pd.proxy.app import ProxySettings, create_app
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.routing import make_policy
from tests.harness.fake_upstream import (
    WAIT_S,
    Answer,
    Call,
    FakeCluster,
    FakeInstance,
    completion,
    completion_chunks,
    in_turn,
    never,
    proxy_on_loopback,
    read_events,
    refused,
    sse,
    stream,
    whole,
)

MODEL = "pd-tiny"
BODY = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4}
STREAMED = {**BODY, "stream": True}
# What a prefill instance's connector answers: where decode finds the prompt's KV.
KV = {"do_remote_prefill": True, "remote_engine_id": "engine-p0", "remote_host": "10.0.0.1",
      "remote_port": 5600, "remote_block_ids": [0, 1], "remote_request_id": "cmpl-p"}  # fmt: skip
# The same from a connector that answers rendezvous (the concurrent flow's second way).
KV_V2 = {**KV, "pd_protocol_version": 2, "remote_ports": [5600, 5601], "tp_size": 1}
KV_ADDRESS = {k: KV_V2[k] for k in ("remote_engine_id", "remote_host", "remote_port",
                                    "remote_ports", "tp_size")}  # fmt: skip
# A client's own kv_transfer_params: never passed on (they could point decode anywhere).
FORGED = {"do_remote_prefill": True, "remote_host": "203.0.113.9", "remote_port": 1}
PREFILLED = completion("!", id="cmpl-p", kv_transfer_params=KV)
DECODED = completion(" world and more", id="cmpl-d")
DECODE_EVENTS = sse(*completion_chunks(" world", " and", " more"))
# Flows and a request each takes its own way with (first-token: streamed requests).
ALL_FLOWS = [("sequential", BODY), ("concurrent", BODY), ("first-token", STREAMED)]


def prefilled(params: dict[str, Any] = KV, text: str = "!") -> Answer:
    """A prefill answer the first-token flow can continue from, too."""
    return whole(completion(text, id="cmpl-p", kv_transfer_params=params, token_ids=[42],
                            prompt_token_ids=[1, 2, 3]))  # fmt: skip


def answers_of(role: str) -> Answer:
    return prefilled() if role == "prefill" else whole(DECODED)


@dataclass
class Proxy:
    cluster: FakeCluster
    pool: InstancePool
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def prefill(self) -> FakeInstance:
        return self.cluster["pd-prefill-0"]

    @property
    def decode(self) -> FakeInstance:
        return self.cluster["pd-decode-0"]

    def instance(self, name: str) -> Instance:
        return self.pool.instances[name]

    def counted(self, metric: str, **labels: str) -> float:
        value = self.app.state.metrics.registry.get_sample_value(metric, labels)
        return 0.0 if value is None else value

    def requests(self, status: int, endpoint: str = "completions") -> float:
        return self.counted("pd_requests_total", endpoint=endpoint, status=str(status))

    def fallbacks(self) -> float:
        return self.counted("pd_prefill_fallbacks_total")

    async def set_health(self, name: str, status: int) -> None:
        """``name``'s /health answers ``status`` and the pool checks every instance."""
        self.cluster[name].health_status = status
        await self.pool.check_all()

    def post(self, body: dict[str, Any], path: str = "/v1/completions") -> asyncio.Task:
        return asyncio.ensure_future(self.client.post(path, json=body))

    def assert_idle(self) -> None:
        """No request left counted on any instance (the legs' books are balanced)."""
        for inst in self.pool.instances.values():
            assert (inst.name, inst.inflight_requests, inst.outstanding_prompt_tokens) == (
                inst.name, 0, 0)  # fmt: skip


@asynccontextmanager
async def proxy(
    flow: str = "sequential", prefills: int = 1, decodes: int = 1, **settings: Any
) -> AsyncIterator[Proxy]:
    roles = [("prefill", i) for i in range(prefills)] + [("decode", i) for i in range(decodes)]
    cluster = FakeCluster(*(FakeInstance(f"pd-{role}-{i}", role, answers_of(role))
                            for role, i in roles))  # fmt: skip
    async with httpx.AsyncClient(transport=cluster.transport) as http:
        instances = [Instance(f.name, f.role, f.url) for f in cluster.instances.values()]
        pool = InstancePool(instances, http, health_timeout_s=2)
        policy = make_policy("round_robin")
        app = create_app(pool, policy, ProxySettings(MODEL, flow=flow, **settings), http)
        await pool.check_all()  # all in rotation
        async with (
            proxy_on_loopback(app) as url,
            # Plain HTTP on loopback: no CA certificates to load (0.1 s a client).
            httpx.AsyncClient(base_url=url, timeout=WAIT_S, verify=False) as client,
        ):
            yield Proxy(cluster, pool, app, client)


def run(test: Callable[[Proxy], Awaitable[None]], flow: str = "sequential", **kwargs: Any) -> None:
    async def go() -> None:
        async with proxy(flow, **kwargs) as p:
            await test(p)

    asyncio.run(asyncio.wait_for(go(), 60))


def without_kv(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "kv_transfer_params"}


async def settled(predicate: Callable[[], bool]) -> None:
    """Wait (bounded) for something the proxy does in the background."""
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


def assert_error_event(event: Any, status: int) -> str:
    assert isinstance(event, dict) and set(event) == {"error"}, event
    error = event["error"]
    assert error["code"] == status and error["message"], error
    return error["message"]


def assert_openai_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error["message"]


# --- the sequential way: prefill with one token, then decode with its KV ---------------


@pytest.mark.parametrize("flow", ["sequential", "concurrent", "first-token"])
def test_prefill_gets_one_token_and_decode_the_kv_prefill_answered(flow):
    """(The concurrent flow's first request to an instance goes this way too, and the
    first-token flow takes it for unstreamed requests.)"""

    async def test(p: Proxy) -> None:
        sent = {**BODY, "min_tokens": 2, "kv_transfer_params": FORGED}
        response = await p.client.post("/v1/completions", json=sent)
        assert response.status_code == 200 and response.json() == DECODED
        ((prefill,), (decode,)) = p.prefill.calls, p.decode.calls
        assert prefill.path == decode.path == "/v1/completions"
        assert prefill.body == {"model": MODEL, "prompt": BODY["prompt"], "max_tokens": 1,
                                "stream": False, "n": 1,
                                "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
        assert decode.body == {**BODY, "min_tokens": 2, "kv_transfer_params": KV}
        assert (prefill.state, decode.state) == ("answered", "answered")
        assert p.requests(200) == 1 and p.fallbacks() == 0
        assert p.counted("pd_prefill_seconds_count") == 1
        p.assert_idle()

    run(test, flow)


@pytest.mark.parametrize("flow", ["sequential", "concurrent"])
def test_streamed_request_relays_decode_stream_unchanged(flow):
    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS)
        sent = {**STREAMED, "stream_options": {"include_usage": True}}
        response = await p.client.post("/v1/completions", json=sent)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.content == b"".join(DECODE_EVENTS)
        ((prefill,), (decode,)) = p.prefill.calls, p.decode.calls
        assert prefill.body["stream"] is False and "stream_options" not in prefill.body
        assert decode.body == {**sent, "kv_transfer_params": KV}
        assert decode.state == "answered"  # read to its end, not aborted
        assert p.requests(200) == 1  # counted once, when the stream ended
        assert p.counted("pd_time_to_first_token_seconds_count") == 1
        assert p.counted("pd_inter_token_latency_seconds_count") == len(DECODE_EVENTS) - 1
        p.assert_idle()

    run(test, flow)


def test_chat_goes_to_the_chat_endpoint_of_both():
    async def test(p: Proxy) -> None:
        sent = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                "max_completion_tokens": 5}  # fmt: skip
        response = await p.client.post("/v1/chat/completions", json=sent)
        assert response.status_code == 200
        ((prefill,), (decode,)) = p.prefill.calls, p.decode.calls
        assert prefill.path == decode.path == "/v1/chat/completions"
        assert "max_completion_tokens" not in prefill.body and prefill.body["max_tokens"] == 1
        assert decode.body == {**sent, "kv_transfer_params": KV}
        assert p.requests(200, endpoint="chat/completions") == 1

    run(test)


@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_many_requests_at_once_each_get_their_own_kv(flow, body):
    """Concurrent requests through one proxy: every decode leg carries the params of
    its own request's prefill answer, never another's."""

    async def own_kv(call: Call) -> httpx.Response:
        prompt = call.body["prompt"]
        number = int(prompt.split()[-1])
        answer = completion("!", kv_transfer_params={**KV, "remote_request_id": prompt},
                            token_ids=[42], prompt_token_ids=[number])  # fmt: skip
        return httpx.Response(200, json=answer)

    async def test(p: Proxy) -> None:
        p.prefill.answer = own_kv
        p.decode.answer = stream(DECODE_EVENTS) if body.get("stream") else whole(DECODED)
        prompts = [f"prompt {i}" for i in range(16)]
        responses = await asyncio.gather(
            *(p.client.post("/v1/completions", json={**body, "prompt": prompt})
              for prompt in prompts)
        )  # fmt: skip
        assert [r.status_code for r in responses] == [200] * len(prompts)
        assert sorted(c.body["prompt"] for c in p.prefill.calls) == sorted(prompts)
        for call in p.decode.calls:
            prompt = call.body["prompt"]
            if flow == "first-token":  # decode continues from prefill's token ids
                assert prompt[1:] == [42]
                prompt = f"prompt {prompt[0]}"
            assert call.body["kv_transfer_params"] == {**KV, "remote_request_id": prompt}
        assert len(p.decode.calls) == len(prompts)
        assert p.requests(200) == len(prompts)
        p.assert_idle()

    run(test, flow)


# --- prefill: rejected, failed, out of rotation -------------------------------------


@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_a_request_prefill_rejects_is_answered_with_its_error(flow, body):
    rejection = {"error": {"message": "prompt is too long", "type": "BadRequestError",
                           "param": None, "code": 400}}  # fmt: skip

    async def test(p: Proxy) -> None:
        p.prefill.answer = whole(rejection, status=400)
        response = await p.client.post("/v1/completions", json=body)
        assert response.status_code == 400 and response.json() == rejection
        assert p.decode.calls == []  # no decode leg for a request that cannot be served
        assert p.requests(400) == 1 and p.fallbacks() == 0
        p.assert_idle()

    run(test, flow)


@pytest.mark.parametrize("failure", ["answers 500", "refuses"])
@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_a_failed_prefill_leg_makes_decode_prefill_itself(flow, body, failure):
    async def test(p: Proxy) -> None:
        if failure == "refuses":
            p.prefill.answer = refused()
            p.prefill.refuse = True  # crashed: its health check is refused too
        else:
            p.prefill.answer = whole({"error": {"message": "boom"}}, status=500)
        p.decode.answer = stream(DECODE_EVENTS) if body.get("stream") else whole(DECODED)
        sent = {**body, "kv_transfer_params": FORGED}
        response = await p.client.post("/v1/completions", json=sent)
        assert response.status_code == 200
        if body.get("stream"):
            assert response.content == b"".join(DECODE_EVENTS)
        else:
            assert response.json() == DECODED
        (decode,) = p.decode.calls
        assert decode.body == body  # the client's request, with no KV to look for
        assert p.fallbacks() == 1 and p.requests(200) == 1
        if failure == "refuses":  # the failure made the pool check it: out at once
            await settled(lambda: not p.instance("pd-prefill-0").healthy)
        p.assert_idle()

    run(test, flow)


@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_a_prefill_leg_gives_up_when_its_instance_leaves_rotation(flow, body):
    async def test(p: Proxy) -> None:
        p.prefill.answer = never()  # stopped: accepts the request, never answers
        p.decode.answer = stream(DECODE_EVENTS) if body.get("stream") else whole(DECODED)
        answer = p.post(body)
        (prefill,) = await p.prefill.wait_calls(1)
        await p.set_health("pd-prefill-0", 503)
        response = await answer
        assert response.status_code == 200
        assert await prefill.wait_ended() == "aborted"
        (decode,) = p.decode.calls
        assert decode.body == body
        assert p.fallbacks() == 1
        p.assert_idle()

    run(test, flow)


@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_decode_serves_alone_while_no_prefill_is_in_rotation(flow, body):
    async def test(p: Proxy) -> None:
        p.decode.answer = in_turn(*[stream(DECODE_EVENTS) if body.get("stream")
                                    else whole(DECODED)] * 2)  # fmt: skip
        await p.set_health("pd-prefill-0", 503)
        health = await p.client.get("/health")
        assert (health.status_code, health.json()) == (
            200, {"status": "degraded", "prefill": 0, "decode": 1})  # fmt: skip
        response = await p.client.post(
            "/v1/completions", json={**body, "kv_transfer_params": FORGED}
        )
        assert response.status_code == 200
        assert p.prefill.calls == [] and [c.body for c in p.decode.calls] == [body]
        assert p.fallbacks() == 1
        # Back in rotation: the next request goes through prefill again.
        await p.set_health("pd-prefill-0", 200)
        assert (await p.client.get("/health")).json()["status"] == "ok"
        assert (await p.client.post("/v1/completions", json=body)).status_code == 200
        assert len(p.prefill.calls) == 1
        assert p.decode.calls[1].body["kv_transfer_params"]["remote_engine_id"] == "engine-p0"
        p.assert_idle()

    run(test, flow)


def test_requests_avoid_an_instance_out_of_rotation():
    async def test(p: Proxy) -> None:
        for fake in p.cluster.instances.values():
            fake.answer = in_turn(*[answers_of(fake.role)] * 6)
        await p.set_health("pd-prefill-0", 503)
        await p.set_health("pd-decode-1", 503)
        for _ in range(6):
            assert (await p.client.post("/v1/completions", json=BODY)).status_code == 200
        calls = {name: len(fake.calls) for name, fake in p.cluster.instances.items()}
        assert calls == {"pd-prefill-0": 0, "pd-prefill-1": 6, "pd-decode-0": 6,
                         "pd-decode-1": 0}  # fmt: skip
        assert p.fallbacks() == 0

    run(test, prefills=2, decodes=2)


# --- decode: failed, out of rotation, broken mid-stream ------------------------------


def test_no_decode_in_rotation_is_a_503():
    async def test(p: Proxy) -> None:
        await p.set_health("pd-decode-0", 503)
        response = await p.client.post("/v1/completions", json=BODY)
        assert "no decode instance" in assert_openai_error(response, 503)
        assert p.prefill.calls == []  # nothing was sent for a request nobody can decode
        health = await p.client.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "unavailable")
        assert_openai_error(await p.client.get("/v1/models"), 503)
        assert p.requests(503) == 1

    run(test)


@pytest.mark.parametrize("body", [BODY, STREAMED])
def test_a_refused_decode_leg_is_a_503_and_takes_the_instance_out(body):
    async def test(p: Proxy) -> None:
        p.decode.answer = refused()
        p.decode.refuse = True
        response = await p.client.post("/v1/completions", json=body)
        assert "decode instance pd-decode-0 failed" in assert_openai_error(response, 503)
        assert len(p.prefill.calls) == 1
        await settled(lambda: not p.instance("pd-decode-0").healthy)
        assert p.requests(503) == 1
        p.assert_idle()

    run(test)


@pytest.mark.parametrize("body", [BODY, STREAMED])
def test_a_decode_leg_ends_with_503_when_its_instance_leaves_rotation(body):
    """Waiting for the whole answer or for the stream's headers, the same."""

    async def test(p: Proxy) -> None:
        p.decode.answer = never()
        answer = p.post(body)
        (decode,) = await p.decode.wait_calls(1)
        await p.set_health("pd-decode-0", 503)
        response = await answer
        assert "stopped answering" in assert_openai_error(response, 503)
        assert await decode.wait_ended() == "aborted"
        assert p.requests(503) == 1
        p.assert_idle()

    run(test)


@pytest.mark.parametrize(("flow", "opening"), [("sequential", []), ("first-token", ["!"])])
def test_decode_breaking_mid_stream_ends_the_stream_with_an_error_event(flow, opening):
    """``opening``: the text the client got before decode's (the first token)."""

    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS[:2], then="break")
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.status_code == 200  # the stream had started
        events = read_events(response.content)
        assert [e["choices"][0]["text"] for e in events[:-1]] == [*opening, " world", " and"]
        assert "failed mid-stream" in assert_error_event(events[-1], 502)
        assert p.requests(502) == 1 and p.requests(200) == 0
        await settled(lambda: p.decode.health_checks >= 2)  # suspected: checked at once
        p.assert_idle()

    run(test, flow)


def test_a_stream_ends_with_503_when_decode_leaves_rotation_mid_stream():
    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS[:1], then="hang")
        async with p.client.stream("POST", "/v1/completions", json=STREAMED) as response:
            chunks = response.aiter_bytes()
            first = await anext(chunks)
            assert read_events(first)[0]["choices"][0]["text"] == " world"
            await p.set_health("pd-decode-0", 503)
            rest = b"".join([chunk async for chunk in chunks])
        (error,) = read_events(rest)
        assert "stopped answering" in assert_error_event(error, 503)
        assert p.decode.calls[0].state == "aborted"
        assert p.requests(503) == 1
        p.assert_idle()

    run(test)


def test_past_the_request_deadline_is_a_504():
    async def test(p: Proxy) -> None:
        p.decode.answer = in_turn(never(), stream(DECODE_EVENTS[:1], then="hang"))
        response = await p.client.post("/v1/completions", json=BODY)
        assert_openai_error(response, 504)
        assert await p.decode.calls[0].wait_ended() == "aborted"
        # A stream that started keeps the same deadline: an error event ends it.
        response = await p.client.post("/v1/completions", json=STREAMED)
        events = read_events(response.content)
        assert events[0]["choices"][0]["text"] == " world"
        assert_error_event(events[1], 504)
        assert await p.decode.calls[1].wait_ended() == "aborted"
        assert p.requests(504) == 2
        p.assert_idle()

    run(test, request_timeout_s=0.5)


def test_decode_rejecting_a_streamed_request_is_answered_with_its_error():
    rejection = {"error": {"message": "bad", "type": "BadRequestError", "param": None,
                           "code": 400}}  # fmt: skip

    async def test(p: Proxy) -> None:
        p.decode.answer = whole(rejection, status=400)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.status_code == 400 and response.json() == rejection
        assert p.requests(400) == 1

    run(test)


# --- the client goes away ---------------------------------------------------------------


@pytest.mark.parametrize(("flow", "body"), ALL_FLOWS)
def test_a_client_leaving_during_prefill_aborts_the_prefill_leg(flow, body):
    async def test(p: Proxy) -> None:
        p.prefill.answer = never()
        answer = p.post(body)
        (prefill,) = await p.prefill.wait_calls(1)
        answer.cancel()  # closes the client's connection
        assert await prefill.wait_ended() == "aborted"
        assert p.decode.calls == []
        await settled(lambda: p.requests(499) == 1)
        p.assert_idle()

    run(test, flow)


@pytest.mark.parametrize("body", [BODY, STREAMED])
def test_a_client_leaving_while_decode_works_aborts_the_decode_leg(body):
    async def test(p: Proxy) -> None:
        p.decode.answer = never() if not body.get("stream") else stream(DECODE_EVENTS[:1],
                                                                        then="hang")  # fmt: skip
        if body.get("stream"):
            async with p.client.stream("POST", "/v1/completions", json=body) as response:
                await anext(response.aiter_bytes())  # the stream runs; then the client leaves
        else:
            answer = p.post(body)
            await p.decode.wait_calls(1)
            answer.cancel()
        assert await p.decode.calls[0].wait_ended() == "aborted"
        await settled(lambda: p.instance("pd-decode-0").inflight_requests == 0)
        p.assert_idle()

    run(test)


# --- the concurrent flow: both legs at once once the KV address is known --------------


async def learn_address(p: Proxy) -> None:
    """One request the sequential way; prefill's answer tells its KV address."""
    p.prefill.answer = prefilled(KV_V2)
    assert (await p.client.post("/v1/completions", json=BODY)).status_code == 200
    assert p.decode.calls[0].body["kv_transfer_params"] == KV_V2


def test_concurrent_flow_sends_both_legs_at_once_tied_by_a_rendezvous():
    async def test(p: Proxy) -> None:
        await learn_address(p)
        prefill_done = asyncio.Event()
        p.prefill.answer = whole(completion("!", kv_transfer_params=KV_V2), gate=prefill_done)
        response = await p.client.post("/v1/completions", json=BODY)
        # Decode answered while prefill was still computing: the legs ran at once.
        assert response.status_code == 200 and response.json() == DECODED
        prefill, decode = p.prefill.calls[1], p.decode.calls[1]
        assert prefill.state == "open"
        tag = decode.body["kv_transfer_params"]["pd_rendezvous"]
        assert len(tag) == 32
        assert decode.body == {**BODY, "kv_transfer_params": {
            **KV_ADDRESS, "do_remote_prefill": True, "pd_rendezvous": tag}}  # fmt: skip
        assert prefill.body["kv_transfer_params"] == {"do_remote_decode": True,
                                                      "pd_rendezvous": tag}  # fmt: skip
        assert prefill.body["max_tokens"] == 1
        prefill_done.set()  # its answer comes back in the background
        assert await prefill.wait_ended() == "answered"
        await settled(lambda: p.instance("pd-prefill-0").inflight_requests == 0)
        assert p.counted("pd_prefill_seconds_count") == 2 and p.fallbacks() == 0
        p.assert_idle()

    run(test, "concurrent")


def test_concurrent_flow_stays_sequential_with_an_older_connector():
    async def test(p: Proxy) -> None:
        for _ in range(2):
            assert (await p.client.post("/v1/completions", json=BODY)).status_code == 200
        assert [c.body["kv_transfer_params"] for c in p.decode.calls] == [KV, KV]
        assert all("pd_rendezvous" not in c.body["kv_transfer_params"] for c in p.prefill.calls)

    run(test, "concurrent")


@pytest.mark.parametrize("body", [BODY, STREAMED])
def test_concurrent_flow_prefill_failing_restarts_decode_without_kv(body):
    async def test(p: Proxy) -> None:
        await learn_address(p)
        p.prefill.answer = whole({"error": {"message": "boom"}}, status=500)
        held = asyncio.Event()  # never set: decode waits for KV that never comes
        served = stream(DECODE_EVENTS) if body.get("stream") else whole(DECODED)
        waiting = stream(DECODE_EVENTS, hold=held, hold_from=0) if body.get("stream") else never()

        async def retried(call: Call) -> httpx.Response:
            if not body.get("stream"):  # the whole answer's tied leg ends before the retry
                assert await p.decode.calls[1].wait_ended() == "aborted"
            return await served(call)

        p.decode.answer = in_turn(waiting, retried)
        response = await p.client.post("/v1/completions", json=body)
        assert response.status_code == 200
        _, tied, alone = p.decode.calls
        assert "pd_rendezvous" in tied.body["kv_transfer_params"]
        assert await tied.wait_ended() == "aborted"
        assert alone.body == body
        assert p.fallbacks() == 1
        p.assert_idle()

    run(test, "concurrent")


@pytest.mark.parametrize("body", [BODY, STREAMED])
def test_concurrent_flow_prefill_rejecting_aborts_the_waiting_decode_leg(body):
    rejection = {"error": {"message": "too long", "type": "BadRequestError", "param": None,
                           "code": 400}}  # fmt: skip

    async def test(p: Proxy) -> None:
        await learn_address(p)
        p.prefill.answer = whole(rejection, status=400)
        held = asyncio.Event()
        p.decode.answer = stream(DECODE_EVENTS, hold=held, hold_from=0) if body.get(
            "stream") else never()  # fmt: skip
        response = await p.client.post("/v1/completions", json=body)
        assert response.status_code == 400 and response.json() == rejection
        assert await p.decode.calls[1].wait_ended() == "aborted"
        assert len(p.decode.calls) == 2 and p.fallbacks() == 0
        p.assert_idle()

    run(test, "concurrent")


def test_concurrent_flow_decode_rejecting_aborts_the_prefill_leg():
    rejection = {"error": {"message": "bad", "type": "BadRequestError", "param": None,
                           "code": 400}}  # fmt: skip

    async def test(p: Proxy) -> None:
        await learn_address(p)
        p.prefill.answer = never()
        p.decode.answer = whole(rejection, status=400)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.status_code == 400 and response.json() == rejection
        assert await p.prefill.calls[1].wait_ended() == "aborted"
        p.assert_idle()

    run(test, "concurrent")


def test_concurrent_flow_client_leaving_aborts_both_legs():
    async def test(p: Proxy) -> None:
        await learn_address(p)
        p.prefill.answer = never()
        p.decode.answer = never()
        answer = p.post(BODY)
        (_, prefill), (_, decode) = await p.prefill.wait_calls(2), await p.decode.wait_calls(2)
        answer.cancel()
        assert await prefill.wait_ended() == "aborted"
        assert await decode.wait_ended() == "aborted"
        p.assert_idle()

    run(test, "concurrent")


# --- the first-token flow: prefill's token goes to the client at once -----------------


def test_first_token_flow_streams_prefill_token_and_decode_continues_from_it():
    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.status_code == 200
        ((prefill,), (decode,)) = p.prefill.calls, p.decode.calls
        assert prefill.body["return_token_ids"] is True and prefill.body["max_tokens"] == 1
        assert prefill.body["stream"] is False
        # The prompt's ids plus the first token, and one token less to generate.
        assert decode.body == {**STREAMED, "prompt": [1, 2, 3, 42], "max_tokens": 3,
                               "kv_transfer_params": KV}  # fmt: skip
        events = read_events(response.content)
        assert [e["choices"][0]["text"] for e in events[:-1]] == ["!", " world", " and", " more"]
        assert {e["id"] for e in events[:-1]} == {"cmpl-p"}  # one answer to the client
        assert events[-1] == "[DONE]"
        assert p.counted("pd_first_token_handoffs_total") == 1 and p.requests(200) == 1
        assert p.counted("pd_time_to_first_token_seconds_count") == 1
        p.assert_idle()

    run(test, "first-token")


def test_first_token_flow_chat_continues_from_the_token_ids():
    prefill_answer = {"id": "chatcmpl-p", "object": "chat.completion", "created": 7,
                      "model": MODEL, "prompt_token_ids": [5, 6], "kv_transfer_params": KV,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo"},
                                   "finish_reason": "length", "token_ids": [42]}]}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 7,
                "model": MODEL, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish}]}  # fmt: skip

    sent = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}

    async def test(p: Proxy) -> None:
        p.prefill.answer = whole(prefill_answer)
        p.decode.answer = stream(
            sse(
                chunk({"role": "assistant", "content": ""}),
                chunk({"content": " there"}),
                chunk({}, "length"),
            )
        )
        response = await p.client.post("/v1/chat/completions", json=sent)
        (decode,) = p.decode.calls
        assert decode.body == {**sent, "kv_transfer_params": {**KV, "prompt_token_ids": [5, 6, 42]}}
        deltas = [e["choices"][0]["delta"] for e in read_events(response.content)[:-1]]
        assert deltas == [{"role": "assistant", "content": ""}, {"content": "Yo"},
                          {"content": " there"}, {}]  # fmt: skip
        assert p.counted("pd_first_token_handoffs_total") == 1

    run(test, "first-token")


def test_first_token_flow_a_request_ended_by_its_first_token_goes_sequentially():
    async def test(p: Proxy) -> None:
        p.prefill.answer = whole(
            completion(
                "", finish="stop", kv_transfer_params=KV, token_ids=[2], prompt_token_ids=[1, 2, 3]
            )
        )
        p.decode.answer = stream(DECODE_EVENTS)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.content == b"".join(DECODE_EVENTS)
        assert p.decode.calls[0].body == {**STREAMED, "kv_transfer_params": KV}
        assert p.counted("pd_first_token_handoffs_total") == 0

    run(test, "first-token")


def test_first_token_flow_a_token_inside_a_character_gets_the_proxys_text():
    """Prefill's token is the first byte of "é": the client gets it at once with no
    text, decode streams token ids, and the proxy writes the text from them."""
    from pd.models import make_model

    inside_a_character = whole(
        completion("", id="cmpl-p", kv_transfer_params=KV, token_ids=[0xC3],
                   prompt_token_ids=[72, 105])
    )  # fmt: skip
    # Decode's own text is wrong here (the whole prompt's, with its first token).
    decoded = sse(*(dict(c, choices=[{**c["choices"][0], "token_ids": ids}])
                    for c, ids in zip(completion_chunks("Hi\u00e9", "!"), ([0xA9], [0x21]),
                                      strict=True)))  # fmt: skip

    async def test(p: Proxy) -> None:
        p.prefill.answer = inside_a_character
        p.decode.answer = stream(decoded)
        response = await p.client.post("/v1/completions", json=STREAMED)
        (decode,) = p.decode.calls
        assert decode.body["return_token_ids"] is True and decode.body["prompt"] == [72, 105, 0xC3]
        chunks = read_events(response.content)[:-1]
        assert [c["choices"][0]["text"] for c in chunks] == ["", "é", "!"]
        assert all("token_ids" not in c["choices"][0] or c["choices"][0]["token_ids"] is None
                   for c in chunks)  # fmt: skip
        assert p.counted("pd_first_token_handoffs_total") == 1

    async def without_tokenizer(p: Proxy) -> None:
        p.prefill.answer = inside_a_character
        p.decode.answer = stream(DECODE_EVENTS)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.content == b"".join(DECODE_EVENTS)  # decode computed it again
        assert p.counted("pd_first_token_handoffs_total") == 0

    run(test, "first-token", tokenizer=str(make_model("tiny")))
    run(without_tokenizer, "first-token")


def test_first_token_flow_requests_that_do_not_qualify_go_sequentially():
    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS)
        sent = {**STREAMED, "seed": 3}  # a seed's samples depend on the token's position
        response = await p.client.post("/v1/completions", json=sent)
        assert response.content == b"".join(DECODE_EVENTS)
        assert "return_token_ids" not in p.prefill.calls[0].body
        assert p.decode.calls[0].body == {**sent, "kv_transfer_params": KV}
        assert p.counted("pd_first_token_handoffs_total") == 0

    run(test, "first-token")


def test_first_token_flow_decode_failing_after_the_token_ends_with_its_error():
    async def test(p: Proxy) -> None:
        p.decode.answer = whole({"error": {"message": "KV cache is full"}}, status=503)
        response = await p.client.post("/v1/completions", json=STREAMED)
        assert response.status_code == 200  # the first token was on its way already
        first, error = read_events(response.content)
        assert first["choices"][0]["text"] == "!"
        assert assert_error_event(error, 503) == "KV cache is full"
        assert p.requests(503) == 1
        p.assert_idle()

    run(test, "first-token")


# --- with the official client -----------------------------------------------------------


def test_openai_client_streams_through_the_proxy():
    async def test(p: Proxy) -> None:
        p.decode.answer = stream(DECODE_EVENTS)
        base_url = str(p.client.base_url).rstrip("/")
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        async with client:
            parts = [c.choices[0].text async for c in await client.completions.create(
                model=MODEL, prompt="Hello", max_tokens=4, stream=True)]  # fmt: skip
            models = await client.models.list()
        assert parts == [" world", " and", " more"]
        assert [m.id for m in models.data] == [MODEL]

    run(test)
