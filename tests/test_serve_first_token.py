"""pd-serve with ``proxy.flow: first-token``: a streamed request's first token is the
prefill leg's, and decode continues from it.

The same cluster as configs/local.yaml. Streamed greedy answers (text, usage) must
equal a single plain vLLM instance's; the KV must still move; requests that do not
qualify go sequentially and are just as correct.
"""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI

from pd.serve_process import PdServeProcess
from tests.harness.openai_api import GREEDY, MESSAGES, PROMPT, SERVED, grew, proxy_metrics

pytestmark = pytest.mark.engines

USAGE = {"stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def serve(first_token_cluster) -> PdServeProcess:
    return first_token_cluster


async def read_stream(stream) -> tuple[str, object, set[str]]:
    """(text, usage, ids) of a streamed answer, completions or chat."""
    parts, usage, ids = [], None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            parts.append((delta.content if delta else choice.text) or "")
    return "".join(parts), usage, ids


def test_streams_equal_single_instance_and_first_token_comes_from_prefill(serve, reference):
    ref_client, ref_model = reference
    cases = [(f"{PROMPT} Variant {i}.", {**GREEDY, "max_tokens": m})
             for i, m in enumerate([2, 3, 16, 16, 40])]  # fmt: skip
    expected = [ref_client.completions.create(model=ref_model, prompt=p, **kw) for p, kw in cases]
    expected_chat = ref_client.chat.completions.create(model=ref_model, messages=MESSAGES, **GREEDY)

    async def go():
        async with AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120) as c:
            before = proxy_metrics(serve)
            streams = [
                await c.completions.create(model=SERVED, prompt=p, stream=True, **kw, **USAGE)
                for p, kw in cases
            ]
            chat = await c.chat.completions.create(
                model=SERVED, messages=MESSAGES, stream=True, **GREEDY, **USAGE
            )
            answers = await asyncio.gather(*(read_stream(s) for s in [*streams, chat]))
            return answers, before

    answers, before = asyncio.run(go())
    for (text, usage, ids), want in zip(answers, [*expected, expected_chat], strict=True):
        want_text = want.choices[0].text if hasattr(want.choices[0], "text") else None
        assert text == (want_text if want_text is not None else want.choices[0].message.content)
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            want.usage.prompt_tokens, want.usage.completion_tokens)  # fmt: skip
        assert len(ids) == 1  # one answer: every event carries the same id
    after = proxy_metrics(serve)
    assert grew(before, after, "pd_first_token_handoffs_total") == 6
    assert grew(before, after, 'pd_kv_transfers{instance="pd-decode-0",role="decode"}') == 6
    assert grew(before, after, 'pd_kv_transfer_failures{instance="pd-decode-0",role="decode"}') == 0
    assert grew(before, after, "pd_prefill_fallbacks_total") == 0


def test_first_tokens_inside_a_character_still_leave_with_the_prefill_answer(serve, reference):
    """The byte-level model's first token is often one byte of a longer character: it
    goes out at once with no text (as vLLM's own stream has it), and the proxy writes
    the text from decode's token ids. Text and usage equal the single instance's."""
    ref_client, ref_model = reference
    prompts = [f"{PROMPT} Case {i}:" for i in range(12)]
    greedy = {**GREEDY, "extra_body": {**GREEDY["extra_body"], "return_token_ids": True}}
    chats = [[{"role": "user", "content": f"Question {i}: prefill or decode?"}] for i in range(8)]
    expected = [ref_client.completions.create(model=ref_model, prompt=p, **greedy)
                for p in prompts]  # fmt: skip
    expected_chats = [ref_client.chat.completions.create(model=ref_model, messages=m, **greedy)
                      for m in chats]  # fmt: skip
    # Bytes from 0x80 up are never a character alone (ids 0-255 are the bytes).
    for answers in (expected, expected_chats):
        inside = [a.choices[0].token_ids[0] >= 0x80 for a in answers]
        assert sum(inside) >= 1, "no request here starts its answer inside a character"

    async def go():
        async with AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120) as c:
            streams = [
                await c.completions.create(model=SERVED, prompt=p, stream=True, **GREEDY, **USAGE)
                for p in prompts
            ] + [
                await c.chat.completions.create(
                    model=SERVED, messages=m, stream=True, **GREEDY, **USAGE
                )
                for m in chats
            ]
            return await asyncio.gather(*(read_stream(s) for s in streams))

    before = proxy_metrics(serve)
    answers = asyncio.run(go())
    wanted = [a.choices[0].text for a in expected] + [
        a.choices[0].message.content for a in expected_chats
    ]
    for (text, usage, ids), want, want_text in zip(
        answers, [*expected, *expected_chats], wanted, strict=True
    ):
        assert text == want_text
        assert usage.completion_tokens == want.usage.completion_tokens
        assert len(ids) == 1
    after = proxy_metrics(serve)
    assert grew(before, after, "pd_first_token_handoffs_total") == len(prompts) + len(chats)
    assert grew(before, after, "pd_prefill_fallbacks_total") == 0


def test_requests_that_do_not_qualify_go_sequentially(serve, reference):
    """Unstreamed, stop strings, logprobs: the first token stays where it is, and the
    answer still equals the single instance's."""
    ref_client, ref_model = reference
    kinds = [{}, {"stop": ["zzz"]}, {"logprobs": 1}]
    expected = [ref_client.completions.create(model=ref_model, prompt=PROMPT, **GREEDY, **k)
                for k in kinds]  # fmt: skip

    async def go():
        async with AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120) as c:
            before = proxy_metrics(serve)
            whole = await c.completions.create(model=SERVED, prompt=PROMPT, **GREEDY)
            streamed = []
            for k in kinds[1:]:
                stream = await c.completions.create(
                    model=SERVED, prompt=PROMPT, stream=True, **GREEDY, **k
                )
                streamed.append(await read_stream(stream))
            return whole, streamed, before

    whole, streamed, before = asyncio.run(go())
    assert whole.choices[0].text == expected[0].choices[0].text
    assert [text for text, _, _ in streamed] == [e.choices[0].text for e in expected[1:]]
    after = proxy_metrics(serve)
    assert grew(before, after, "pd_first_token_handoffs_total") == 0
    assert grew(before, after, 'pd_kv_transfers{instance="pd-decode-0",role="decode"}') == 3
