"""The systems compared, each pd-serve on configs/local.yaml with the tiny model at
BLOCK_SIZE-token blocks, on the machine's cores, and the counters read around a run.

kv_aware      2 prefill + 1 decode, ``routing: kv_aware`` (its defaults)
least_loaded  2 prefill + 1 decode, ``routing: least_loaded``
round_robin   2 prefill + 1 decode, ``routing: round_robin``
one_prefill   1 prefill + 1 decode (the reference: one prefill cache sees every prompt)
"""

from __future__ import annotations

from typing import Any

import httpx

from pd.serve_process import PdServeProcess, local_config
from pd.vllm_server import parse_prometheus

from .settings import BLOCK_SIZE

SYSTEMS = ("kv_aware", "least_loaded", "round_robin", "one_prefill")
# Each instance's counters kept per run (vLLM's own), tokens unless named otherwise.
INSTANCE_COUNTERS = {
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "external_queries": "vllm:external_prefix_cache_queries_total",
    "external_hits": "vllm:external_prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "requests": "vllm:request_success_total",
}
DECISIONS = ("prefill", "decode_only", "no_prefill")
# The proxy's routing figures, sums and counts of its histograms
SUMMED = ("routing_s_sum", "routing_count", "tokenize_s_sum", "tokenize_count", "routing_cpu_s_sum")


def config(system: str, served_name: str, engine_blocks: int | None) -> dict[str, Any]:
    """``engine_blocks``: every instance's KV cache in blocks (None: 1 GiB's worth)."""
    engine_args: dict[str, Any] = {"block_size": BLOCK_SIZE}
    env: dict[str, str] = {}
    if engine_blocks is not None:
        engine_args["num_gpu_blocks_override"] = engine_blocks
        # Sized by blocks, pd leaves the cache to vLLM, which would then reserve most of
        # the machine's memory (as on a GPU): 1 GiB, of which the blocks are used.
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    return local_config({
        "model": {"served_name": served_name},
        "engine_args": engine_args,
        "prefill": {"instances": 1 if system == "one_prefill" else 2, "env": env},
        "decode": {"env": env},
        "proxy": {"routing": "least_loaded" if system == "one_prefill" else system},
    })  # fmt: skip


def counters(serve: PdServeProcess) -> dict[str, Any]:
    """Every instance's INSTANCE_COUNTERS, the proxy's routing decisions and its
    routing time (sum and count of ``pd_routing_seconds`` and of its tokenizing part)."""
    instances = {}
    for name, instance in sorted(serve.instances().items()):
        samples = _samples(instance.url)
        instances[name] = {
            key: sum(v for k, v in samples.items() if k.split("{")[0] == metric)
            for key, metric in INSTANCE_COUNTERS.items()
        }
    proxy = _samples(serve.url)
    return {
        "instances": instances,
        "decisions": {
            d: proxy.get(f'pd_routing_decisions_total{{decision="{d}"}}', 0.0) for d in DECISIONS
        },
        "routing_s_sum": proxy.get("pd_routing_seconds_sum", 0.0),
        "routing_count": proxy.get("pd_routing_seconds_count", 0.0),
        # Of the routing time, tokenizing (kv_aware only; the other policies never ask)
        "tokenize_s_sum": proxy.get("pd_routing_tokenize_seconds_sum", 0.0),
        "tokenize_count": proxy.get("pd_routing_tokenize_seconds_count", 0.0),
        # Of the routing time, the proxy thread's CPU time (the rest: waiting for a core)
        "routing_cpu_s_sum": proxy.get("pd_routing_cpu_seconds_sum", 0.0),
        # The proxy's prefill legs and routing calls by duration (cumulative counts per
        # bucket bound, seconds): where slow TTFTs are, what makes the routing mean.
        "prefill_leg_s": _buckets(proxy, "pd_prefill_seconds"),
        "routing_s": _buckets(proxy, "pd_routing_seconds"),
    }


def _buckets(samples: dict[str, float], histogram: str) -> dict[str, float]:
    return {
        k.split('le="')[1].rstrip('"}'): v
        for k, v in samples.items()
        if k.startswith(f"{histogram}_bucket")
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What grew between two ``counters`` readings."""
    return {
        "instances": {
            name: {k: v - before["instances"].get(name, {}).get(k, 0.0) for k, v in row.items()}
            for name, row in after["instances"].items()
        },
        "decisions": {d: v - before["decisions"][d] for d, v in after["decisions"].items()},
        **{key: after[key] - before[key] for key in SUMMED},
        **{
            key: {le: n - before[key].get(le, 0.0) for le, n in after[key].items()}
            for key in ("prefill_leg_s", "routing_s")
        },
    }


def _samples(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{url}/metrics", timeout=30).text)
