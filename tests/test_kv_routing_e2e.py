"""``routing: kv_aware`` end to end: pd-serve with 2 prefill + 1 decode instances of the
tiny model (one start for the module), KV events from the real engines.

The tests run in order, each building on what the instances cache by then:
- the proxy tokenizes requests as the instances do (their /tokenize);
- a cold prefix goes to pd-prefill-0 (no one holds it; ties go by name); with
  pd-prefill-0 out of rotation (SIGSTOP) a request repeating it goes to
  pd-prefill-1 and is answered as a single plain vLLM instance answers it, and a
  new prefix Y is cached there;
- back in rotation, a request repeating Y goes to pd-prefill-1, which holds it,
  not to pd-prefill-0, which a tie would pick: asserted on both instances' own
  prefix-cache counters;
- a request decode holds nearly all of skips the prefill leg (conditional
  disaggregation), counted as such, with the single instance's greedy output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from pd.proxy.tokenizer import ModelTokenizer
from pd.serve_process import PdServeProcess, VllmInstance, local_config
from pd.vllm_server import parse_prometheus
from tests.harness.openai_api import GREEDY, SERVED, client_of, grew, proxy_metrics
from tests.harness.waiting import wait_for

pytestmark = pytest.mark.engines

BLOCK = 32
MAX_UNCACHED = 64  # decode-only when decode would compute at most this many tokens
KV_AWARE = local_config(
    {
        "prefill": {"instances": 2},
        "engine_args": {"block_size": BLOCK},
        "proxy": {
            "routing": "kv_aware",
            "kv_aware": {
                # One reason for decode-only at a time: decode would compute little.
                "decode_only_cached_fraction": None,
                "decode_only_max_uncached_tokens": MAX_UNCACHED,
                "decode_only_token_weight": None,
            },
        },
        "timeouts": {"health_interval_s": 1, "health_misses": 1},
    }
)
# The tiny model's tokenizer is byte-level: one token per ASCII character.
PREFIX_X = "Shared document X about prefill and decode instances. " * 6  # 324 tokens
PREFIX_Y = "Another tenant's context Y: routing by cached blocks. " * 6
SUFFIXES = [f" Question {i}: " + "why is the cache where it is? " * 5 for i in range(5)]
WAIT_S = 60


@pytest.fixture(scope="module")
def serve(cluster_pool) -> Iterator[PdServeProcess]:
    serve = cluster_pool.get(KV_AWARE)
    yield serve
    serve.resume_all()


@pytest.fixture(scope="module")
def client(serve) -> OpenAI:
    return client_of(serve)


def instance(serve: PdServeProcess, name: str) -> VllmInstance:
    found = serve.instances()
    assert name in found, f"{name} not running: {sorted(found)}"
    return found[name]


def counters(serve: PdServeProcess, name: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{instance(serve, name).url}/metrics", timeout=10).text)


def index_blocks(serve: PdServeProcess, name: str) -> float:
    role = name.split("-")[1]
    return proxy_metrics(serve).get(f'pd_kv_index_blocks{{instance="{name}",role="{role}"}}', 0)


def decisions(serve: PdServeProcess, decision: str) -> float:
    return proxy_metrics(serve).get(f'pd_routing_decisions_total{{decision="{decision}"}}', 0)


def health(serve: PdServeProcess) -> dict:
    return httpx.get(f"{serve.url}/health", timeout=5).json()


def complete(client: OpenAI, prompt: str) -> str:
    return client.completions.create(model=SERVED, prompt=prompt, **GREEDY).choices[0].text


def expected(reference: tuple[OpenAI, str], prompt: str) -> str:
    ref_client, ref_model = reference
    return ref_client.completions.create(model=ref_model, prompt=prompt, **GREEDY).choices[0].text


def served_on(
    serve: PdServeProcess,
    client: OpenAI,
    prompt: str,
    names: tuple[str, ...] = ("pd-prefill-0", "pd-prefill-1"),
) -> tuple[str, dict, dict]:
    """Send ``prompt``; its text, and the counter growth (queries, hits) of each prefill
    instance in ``names`` (a stopped one cannot be asked)."""
    before = {n: counters(serve, n) for n in names}
    indexed = {"pd-decode-0": index_blocks(serve, "pd-decode-0")}
    text = complete(client, prompt)
    after = {n: counters(serve, n) for n in names}
    queries = {n: grew(before[n], after[n], "vllm:prefix_cache_queries_total") for n in names}
    hits = {n: grew(before[n], after[n], "vllm:prefix_cache_hits_total") for n in names}
    # The events of what was just cached reach the proxy's index before the next request.
    assert wait_for(lambda: index_blocks(serve, "pd-decode-0") > indexed["pd-decode-0"], WAIT_S)
    return text, queries, hits


def test_the_proxy_tokenizes_as_the_instances_do(serve):
    from pd.models import make_model

    tokenizer = ModelTokenizer(str(make_model("tiny")))
    decode = instance(serve, "pd-decode-0").url
    messages = [{"role": "user", "content": "Where is my prefix cached?"}]
    for body, endpoint in (
        ({"prompt": PREFIX_X}, "completions"),
        ({"messages": messages}, "chat/completions"),
    ):
        ours = asyncio.run(tokenizer.token_ids(endpoint, body))
        theirs = httpx.post(f"{decode}/tokenize", json={"model": SERVED, **body}, timeout=30)
        assert ours == theirs.json()["tokens"], endpoint


def test_with_the_holder_out_of_rotation_a_repeated_prefix_goes_to_the_other(
    serve, client, reference
):
    _, queries, _ = served_on(serve, client, PREFIX_X + SUFFIXES[0])
    assert queries["pd-prefill-0"] > 0 and queries["pd-prefill-1"] == 0  # cold: by name
    assert wait_for(lambda: index_blocks(serve, "pd-prefill-0") >= len(PREFIX_X) // BLOCK, WAIT_S)

    stopped = instance(serve, "pd-prefill-0")
    stopped.stop()  # SIGSTOP: health checks take it out, its index entries go
    try:
        assert wait_for(lambda: health(serve)["prefill"] == 1, WAIT_S)
        assert wait_for(lambda: index_blocks(serve, "pd-prefill-0") == 0, WAIT_S)
        prompt = PREFIX_X + SUFFIXES[1]
        text, queries, _ = served_on(serve, client, prompt, ("pd-prefill-1",))
        assert queries["pd-prefill-1"] > 0
        assert text == expected(reference, prompt)
        _, queries, _ = served_on(serve, client, PREFIX_Y + SUFFIXES[2], ("pd-prefill-1",))
        assert queries["pd-prefill-1"] > 0
    finally:
        stopped.resume()
    assert wait_for(lambda: health(serve)["prefill"] == 2, WAIT_S)
    # Back in rotation, what it still caches is learned again from its replay socket.
    assert wait_for(lambda: index_blocks(serve, "pd-prefill-0") >= len(PREFIX_X) // BLOCK, WAIT_S)


def test_a_repeated_prefix_goes_to_the_instance_that_holds_it(serve, client, reference):
    before = decisions(serve, "prefill")
    prompt = PREFIX_Y + SUFFIXES[3]
    text, queries, hits = served_on(serve, client, prompt)
    # pd-prefill-1 holds Y; pd-prefill-0 (which a tie would choose) never saw the request.
    assert queries["pd-prefill-0"] == 0
    assert hits["pd-prefill-1"] >= (len(PREFIX_Y) // BLOCK) * BLOCK
    assert decisions(serve, "prefill") == before + 1
    assert text == expected(reference, prompt)
    feeds = proxy_metrics(serve)
    for name in ("pd-prefill-0", "pd-prefill-1", "pd-decode-0"):
        assert feeds[f'pd_kv_events{{instance="{name}",kind="batches"}}'] > 0
        assert feeds[f'pd_kv_events{{instance="{name}",kind="hash_mismatches"}}'] == 0


def test_a_prompt_decode_holds_nearly_all_of_skips_prefill_with_the_same_output(
    serve, client, reference
):
    # Decode holds the previous request's full blocks (it loaded them): what it lacks of
    # this one is under a block plus a few tokens.
    prompt = PREFIX_Y + SUFFIXES[3] + " And one more?"
    before = decisions(serve, "decode_only")
    fallbacks = proxy_metrics(serve).get("pd_prefill_fallbacks_total", 0)
    text, queries, _ = served_on(serve, client, prompt)
    assert queries == {"pd-prefill-0": 0, "pd-prefill-1": 0}  # no prefill leg
    assert decisions(serve, "decode_only") == before + 1
    assert proxy_metrics(serve).get("pd_prefill_fallbacks_total", 0) == fallbacks
    assert text == expected(reference, prompt)
