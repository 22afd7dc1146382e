"""``routing: kv_aware`` (engine-free): its decisions, its config, its plan, and how the
proxy serves and counts a decode-only route.

The index is filled as the instances' events would fill it: with the hashes the
proxy's own hasher gives the prompt's blocks (tests/test_kv_index.py checks those
against vLLM's).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from pd.cluster.config import ClusterConfig, format_validation_error
from pd.cluster.plan import make_plan
from pd.proxy.app import ProxySettings, create_app
from pd.proxy.block_hashing import BlockHasher
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_index import KVIndex
from pd.proxy.kv_routing import KVAware
from pd.proxy.routing import DECODE_ONLY, NO_PREFILL, PREFILL, Route, RoutingRequest, make_policy
from pd.routing_settings import KVAwareSettings
from tests.harness.fake_upstream import (
    FakeCluster,
    FakeInstance,
    completion,
    proxy_on_loopback,
    whole,
)

BLOCK = 4
PROMPT = list(range(100, 140))  # 40 tokens: 10 blocks
HASHES = BlockHasher(BLOCK).hashes(PROMPT)


class Ids:
    def __init__(self, ids: list[int] | None) -> None:
        self.ids = ids

    async def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        return self.ids


def request(ids: list[int] | None = PROMPT, **body: Any) -> RoutingRequest:
    return RoutingRequest("completions", {"prompt": "x", **body}, Ids(ids))


def instances(role: str, n: int) -> list[Instance]:
    return [Instance(f"pd-{role}-{i}", role, url=f"http://h:{i}", healthy=True) for i in range(n)]


def policy(holdings: dict[str, int], **settings: Any) -> KVAware:
    """A policy whose index says instance ``name`` holds the prompt's first N blocks."""
    index = KVIndex()
    for name, blocks in holdings.items():
        index.stored(name, HASHES[:blocks], block_size=BLOCK)
    # Each rule on its own: the others off unless a test turns them on.
    defaults = {"decode_only_cached_fraction": None, "decode_only_max_uncached_tokens": 0,
                "decode_only_token_weight": None, "expected_block_ttl_s": 0.0}  # fmt: skip
    return KVAware(KVAwareSettings(**{**defaults, **settings}), index=index)


def route(p: KVAware, req: RoutingRequest, prefills: list[Instance], decodes: list[Instance]):
    return asyncio.run(p.route(req, prefills, decodes))


def names(r: Route) -> tuple[str | None, str, str]:
    return (r.prefill.name if r.prefill else None, r.decode.name, r.kind)


P, D = instances("prefill", 3), instances("decode", 2)


def test_prefill_goes_where_the_longest_prefix_is():
    r = route(policy({"pd-prefill-1": 6, "pd-prefill-2": 3}), request(), P, D[:1])
    assert names(r) == ("pd-prefill-1", "pd-decode-0", PREFILL)


def test_prefill_cost_counts_the_tokens_queued_there_too():
    prefills = instances("prefill", 2)
    prefills[1].outstanding_prompt_tokens = 30  # holds 24 of 40 tokens, 30 queued: 16 + 30
    p = policy({"pd-prefill-1": 6}, queued_token_weight=1.0)
    assert names(route(p, request(), prefills, D[:1]))[0] == "pd-prefill-0"  # 40 + 0
    p = policy({"pd-prefill-1": 6}, queued_token_weight=0.5)
    assert names(route(p, request(), prefills, D[:1]))[0] == "pd-prefill-1"  # 16 + 15


def test_a_salted_prompt_does_not_match_the_unsalted_blocks():
    p = policy({"pd-prefill-1": 6})
    assert names(route(p, request(cache_salt="tenant-b"), P, D[:1]))[0] == "pd-prefill-0"
    assert names(route(p, request(), P, D[:1]))[0] == "pd-prefill-1"


def test_decode_prefers_the_holder_while_its_load_allows():
    decodes = instances("decode", 2)
    decodes[1].inflight_requests = 2
    p = policy({"pd-decode-1": 5}, decode_affinity_slack=2)
    assert names(route(p, request(), P, decodes))[1] == "pd-decode-1"
    decodes[1].inflight_requests = 3  # beyond the slack: the least loaded
    assert names(route(p, request(), P, decodes))[1] == "pd-decode-0"


def test_no_prefill_leg_when_decode_holds_most_of_the_prompt():
    p = policy({"pd-decode-0": 9, "pd-prefill-0": 9}, decode_only_cached_fraction=0.9)
    assert names(route(p, request(), P, D[:1])) == (None, "pd-decode-0", DECODE_ONLY)
    p = policy({"pd-decode-0": 8}, decode_only_cached_fraction=0.9)  # 32 of 40: 0.8
    assert names(route(p, request(), P, D[:1]))[2] == PREFILL


def test_no_prefill_leg_when_what_decode_lacks_is_short():
    p = policy({"pd-decode-0": 7}, decode_only_max_uncached_tokens=12)  # lacks 12
    assert names(route(p, request(), P, D[:1])) == (None, "pd-decode-0", DECODE_ONLY)
    p = policy({"pd-decode-0": 6}, decode_only_max_uncached_tokens=12)  # lacks 16
    assert names(route(p, request(), P, D[:1]))[2] == PREFILL
    short = list(range(10))
    p = policy({}, decode_only_max_uncached_tokens=12)
    assert names(route(p, request(short), P, D[:1]))[2] == DECODE_ONLY  # held by nobody


def test_no_prefill_leg_when_prefill_would_compute_again_what_decode_holds():
    # Decode holds 8 blocks (a conversation's last turn went decode-only), the prefill
    # instance 2: decode would compute 8 tokens, prefill 32.
    holdings = {"pd-decode-0": 8, "pd-prefill-0": 2}
    p = policy(holdings, decode_only_token_weight=4.0)  # 4 x 8 <= 32
    assert names(route(p, request(), P[:1], D[:1])) == (None, "pd-decode-0", DECODE_ONLY)
    p = policy(holdings, decode_only_token_weight=4.5)  # 36 > 32
    assert names(route(p, request(), P[:1], D[:1]))[2] == PREFILL
    queued = instances("prefill", 1)
    queued[0].outstanding_prompt_tokens = 8  # its queue counts in its cost: 32 + 0.5 x 8
    p = policy(holdings, decode_only_token_weight=4.5, queued_token_weight=0.5)
    assert names(route(p, request(), queued, D[:1]))[2] == DECODE_ONLY


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_routed_prompt_is_expected_where_it_will_be_computed_until_its_events_come():
    clock = Clock()
    index = KVIndex(clock=clock)
    for name in ("pd-prefill-0", "pd-prefill-1", "pd-decode-0"):
        index.stored(name, [], block_size=BLOCK)  # known instances, holding nothing
    settings = KVAwareSettings(decode_only_cached_fraction=None, decode_only_max_uncached_tokens=0,
                               decode_only_token_weight=None, expected_block_ttl_s=5.0)  # fmt: skip
    p = KVAware(settings, index=index)
    prefills = instances("prefill", 2)
    prefills[0].outstanding_prompt_tokens = 1  # the first turn goes to pd-prefill-1
    first = route(p, request(PROMPT[:24]), prefills, D[:1])
    assert names(first) == ("pd-prefill-1", "pd-decode-0", PREFILL)
    prefills[1].outstanding_prompt_tokens = 24  # still computing it: no event yet
    # The next turn extends it: it follows the first there, where its 6 blocks will be.
    assert names(route(p, request(), prefills, D[:1]))[0] == "pd-prefill-1"  # 16 + 12 < 40
    assert index.cached_blocks("pd-decode-0", HASHES) == 0  # decode: once loaded, not now
    clock.now += 6  # the expectation lapsed without an event: by load again
    assert index.cached_blocks("pd-prefill-1", HASHES) == 0
    assert names(route(p, request(PROMPT[:24] + [7] * 16), prefills, D[:1]))[0] == "pd-prefill-0"


def test_a_decode_only_route_expects_the_prompt_on_decode():
    clock = Clock()
    index = KVIndex(clock=clock)
    index.stored("pd-decode-0", HASHES[:9], block_size=BLOCK)
    index.stored("pd-prefill-0", [], block_size=BLOCK)
    longer = PROMPT + list(range(500, 508))  # 12 blocks; decode holds 9
    settings = KVAwareSettings(decode_only_cached_fraction=0.7, expected_block_ttl_s=5.0)
    p = KVAware(settings, index=index)
    assert names(route(p, request(longer), P[:1], D[:1]))[2] == DECODE_ONLY
    hashes = BlockHasher(BLOCK).hashes(longer)
    assert index.cached_blocks("pd-decode-0", hashes) == 12
    assert index.cached_blocks("pd-prefill-0", hashes) == 0


def test_without_token_ids_or_prefill_instances_it_routes_by_load():
    prefills = instances("prefill", 2)
    prefills[0].outstanding_prompt_tokens = 5
    p = policy({"pd-prefill-0": 10})
    assert names(route(p, request(None), prefills, D)) == ("pd-prefill-1", "pd-decode-0", PREFILL)
    assert names(route(p, request(), [], D)) == (None, "pd-decode-0", NO_PREFILL)


def test_an_empty_index_is_all_misses():
    p = KVAware(KVAwareSettings(decode_only_max_uncached_tokens=0))
    assert names(route(p, request(), P, D))[2] == PREFILL


def test_kv_aware_comes_from_the_registry_with_its_options():
    made = make_policy("kv_aware", settings=KVAwareSettings(decode_affinity_slack=5))
    assert isinstance(made, KVAware) and made.settings.decode_affinity_slack == 5
    with pytest.raises(ValueError, match="cannot be reproduced"):
        make_policy("kv_aware", hash_algorithm="xxhash")


# --- the proxy: a decode-only route is a decision, not a fallback --------------------------


def test_a_decode_only_route_goes_to_decode_alone_and_is_counted_as_a_decision():
    from pd.models import make_model
    from pd.proxy.tokenizer import ModelTokenizer

    folder = str(make_model("tiny"))
    text = "The prompt decode holds already, nearly all"
    ids = asyncio.run(ModelTokenizer(folder).token_ids("completions", {"prompt": text}))
    assert ids is not None and len(ids) % BLOCK != 0
    index = KVIndex()
    index.stored("pd-decode-0", BlockHasher(BLOCK).hashes(ids), block_size=BLOCK)
    settings = KVAwareSettings(decode_only_cached_fraction=0.9, decode_only_max_uncached_tokens=0)
    kv = KVAware(settings, index=index)

    async def test() -> None:
        fakes = [
            FakeInstance("pd-prefill-0", "prefill", whole(completion("!"))),
            FakeInstance("pd-decode-0", "decode", whole(completion(" ok", id="cmpl-d"))),
        ]
        cluster = FakeCluster(*fakes)
        async with httpx.AsyncClient(transport=cluster.transport) as http:
            pool = InstancePool([Instance(f.name, f.role, f.url) for f in fakes], http)
            app = create_app(pool, kv, ProxySettings("pd-tiny", tokenizer=folder), http)
            await pool.check_all()
            async with proxy_on_loopback(app) as url, httpx.AsyncClient(base_url=url) as client:
                body = {"model": "pd-tiny", "prompt": text, "max_tokens": 3}
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                assert cluster["pd-prefill-0"].calls == []
                assert [c.body for c in cluster["pd-decode-0"].calls] == [body]
                metrics = app.state.metrics.registry
                decisions = {"decision": "decode_only"}
                assert metrics.get_sample_value("pd_routing_decisions_total", decisions) == 1
                assert metrics.get_sample_value("pd_prefill_fallbacks_total") == 0
                blocks = len(ids) // BLOCK
                text_metrics = (await client.get("/metrics")).text
                assert f'pd_kv_index_blocks{{instance="pd-decode-0",role="decode"}} {blocks}.0' in (
                    text_metrics
                )
                # Another prompt: nobody holds it, both legs.
                other = {**body, "prompt": "Something else entirely, and long enough" * 2}
                cluster["pd-prefill-0"].answer = whole(completion("!"))
                await client.post("/v1/completions", json=other)
                assert len(cluster["pd-prefill-0"].calls) == 1
                decisions = {"decision": "prefill"}
                assert metrics.get_sample_value("pd_routing_decisions_total", decisions) == 1
                # Both routes timed, with their tokenizing and the proxy thread's CPU time
                for histogram in ("routing", "routing_tokenize", "routing_cpu"):
                    count = metrics.get_sample_value(f"pd_{histogram}_seconds_count")
                    assert count == 2, histogram
                wall = metrics.get_sample_value("pd_routing_seconds_sum")
                assert 0 < metrics.get_sample_value("pd_routing_tokenize_seconds_sum") <= wall
                assert metrics.get_sample_value("pd_routing_cpu_seconds_sum") > 0

    asyncio.run(asyncio.wait_for(test(), 60))


# --- cluster.yaml and the plan -------------------------------------------------------------


def config(**extra: Any) -> ClusterConfig:
    base: dict[str, Any] = {"model": {"preset": "tiny"}, "prefill": {"instances": 2},
                            "proxy": {"routing": "kv_aware"}}  # fmt: skip
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value}
    return ClusterConfig.model_validate(base)


def problem(**extra: Any) -> str:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        config(**extra)
    return format_validation_error(e.value)


def test_kv_aware_settings_are_validated_with_the_key_named():
    assert "proxy.kv_aware: decode_only_cached_fraction must be in (0, 1]" in problem(
        proxy={"routing": "kv_aware", "kv_aware": {"decode_only_cached_fraction": 1.5}}
    )
    assert "proxy.kv_aware.bogus: unknown key" in problem(proxy={"kv_aware": {"bogus": 1}})
    assert "engine_args.prefix_caching_hash_algo: 'xxhash'" in problem(
        engine_args={"prefix_caching_hash_algo": "xxhash"}
    )
    assert "decode.engine_args.enable_prefix_caching" in problem(
        decode={"engine_args": {"enable_prefix_caching": False}}
    )
    assert "engine_args.kv_events_config: set by pd" in problem(
        engine_args={"kv_events_config": {"enable_kv_cache_events": True}}
    )
    assert "PYTHONHASHSEED" in problem(prefill={"instances": 2, "env": {"PYTHONHASHSEED": "1"}})
    assert "decode_only_token_weight must be positive" in problem(
        proxy={"kv_aware": {"decode_only_token_weight": 0}}
    )
    assert "expected_block_ttl_s must be at least 0" in problem(
        proxy={"kv_aware": {"expected_block_ttl_s": -1}}
    )
    settings = config(proxy={"routing": "kv_aware", "kv_aware": {
        "queued_token_weight": 0.25, "decode_only_token_weight": None,
        "expected_block_ttl_s": 0}})  # fmt: skip
    assert settings.proxy.kv_aware.settings() == KVAwareSettings(
        queued_token_weight=0.25, decode_only_token_weight=None, expected_block_ttl_s=0.0
    )
    assert KVAwareSettings().decode_affinity_slack == settings.proxy.kv_aware.decode_affinity_slack


def events_config(args: list[str]) -> dict[str, Any] | None:
    if "--kv-events-config" not in args:
        return None
    return json.loads(args[args.index("--kv-events-config") + 1])


def test_the_plan_gives_each_instance_its_own_event_sockets():
    plan = make_plan(config(), available_cores=[0, 1])
    seen = set()
    for inst in plan.instances:
        events = events_config(inst.vllm_args)
        assert events is not None and events["enable_kv_cache_events"] is True
        assert (events["endpoint"], events["replay_endpoint"]) == inst.kv_events
        assert events["endpoint"].startswith("ipc:///tmp/pd-kv-")  # a local cluster: no TCP
        seen.update(inst.kv_events or ())
    assert len(seen) == 2 * len(plan.instances) == 6
    other = make_plan(config(), available_cores=[0, 1])
    assert not seen & {e for i in other.instances for e in i.kv_events or ()}  # per start


def test_a_joined_cluster_publishes_on_numbered_tcp_ports():
    joined = config(ray={"address": "10.0.0.1:6379"}, proxy={"routing": "kv_aware",
                    "kv_aware": {"events_port": 6000}})  # fmt: skip
    plan = make_plan(joined, available_cores=[0, 1])
    assert [i.kv_events for i in plan.instances] == [
        ("tcp://*:6000", "tcp://*:6001"), ("tcp://*:6002", "tcp://*:6003"),
        ("tcp://*:6004", "tcp://*:6005"),
    ]  # fmt: skip


def test_other_policies_publish_no_events():
    plan = make_plan(config(proxy={"routing": "least_loaded"}), available_cores=[0, 1])
    assert all(events_config(i.vllm_args) is None and i.kv_events is None for i in plan.instances)


def test_ipc_socket_files_are_removed_after_the_instances(tmp_path):
    from pd.cluster.kv_events import remove_ipc_files

    files = [tmp_path / "a.pub", tmp_path / "a.replay"]
    for f in files:
        f.touch()
    remove_ipc_files([(f"ipc://{files[0]}", f"ipc://{files[1]}"), ("tcp://*:1", "tcp://*:2")])
    assert not any(f.exists() for f in files)
