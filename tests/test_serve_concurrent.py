"""pd-serve with ``proxy.flow: concurrent``: both legs of a request at once.

The same cluster as configs/local.yaml, but the proxy sends each request to its
prefill and decode instances together (a rendezvous tag ties them). Greedy answers
must equal a single plain vLLM instance's, the KV must still move (no recompute),
and a prefill leg that fails must end in decode recomputing, never in a hang.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import AsyncOpenAI

from pd.serve_process import PdServeProcess
from tests.harness.openai_api import GREEDY, MESSAGES, PROMPT, SERVED, grew, proxy_metrics

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def serve(concurrent_cluster) -> PdServeProcess:
    return concurrent_cluster


def test_answers_equal_single_instance_and_kv_moves(serve, reference):
    ref_client, ref_model = reference
    prompts = [f"{PROMPT} Variant {i}." for i in range(6)]
    expected = [ref_client.completions.create(model=ref_model, prompt=p, **GREEDY).choices[0].text
                for p in prompts]  # fmt: skip
    expected_chat = ref_client.chat.completions.create(model=ref_model, messages=MESSAGES, **GREEDY)

    async def go():
        async with AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120) as c:
            # The first request to the prefill instance teaches the proxy its KV address.
            await c.completions.create(model=SERVED, prompt="warm up", max_tokens=2)
            before = proxy_metrics(serve)
            whole = asyncio.gather(
                *(c.completions.create(model=SERVED, prompt=p, **GREEDY) for p in prompts)
            )
            stream = await c.chat.completions.create(
                model=SERVED, messages=MESSAGES, stream=True, **GREEDY
            )
            streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream
                                if ch.choices])  # fmt: skip
            return [r.choices[0].text for r in await whole], streamed, before

    texts, streamed, before = asyncio.run(go())
    assert texts == expected
    assert streamed == expected_chat.choices[0].message.content
    after = proxy_metrics(serve)
    assert grew(before, after, 'pd_kv_transfers{instance="pd-decode-0",role="decode"}') == 7
    assert grew(before, after, 'pd_kv_transfer_failures{instance="pd-decode-0",role="decode"}') == 0
    assert grew(before, after, "pd_prefill_fallbacks_total") == 0


def test_prefill_rejection_is_the_answer_and_cluster_keeps_serving(serve):
    """A request both instances reject (prompt over the context): one clean 400, and
    the next request is served."""
    body = {"model": SERVED, "prompt": "prefill " * 3000, "max_tokens": 4}
    response = httpx.post(f"{serve.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "context length" in response.json()["error"]["message"]
    ok_body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 4}
    ok = httpx.post(f"{serve.url}/v1/completions", json=ok_body, timeout=60)
    assert ok.status_code == 200, ok.text
