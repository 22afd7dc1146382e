"""Counters read around a phase: an instance's /metrics and the store process's stats."""

from __future__ import annotations

from typing import Any

from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.vllm_server import VllmServer

from .settings import BLOCK_SIZE

# vLLM's and pd's counters (tokens unless named otherwise) a phase reports as deltas.
INSTANCE_COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "external_hits": "vllm:external_prefix_cache_hits_total",
    "store_hit_tokens": "vllm:pd_kv_store_hit_tokens_total",
    "store_miss_tokens": "vllm:pd_kv_store_miss_tokens_total",
    "store_blocks_loaded": "vllm:pd_kv_store_blocks_loaded_total",
    "store_load_failures": "vllm:pd_kv_store_load_failures_total",
    "store_blocks_stored": "vllm:pd_kv_store_blocks_stored_total",
    "store_saves_skipped": "vllm:pd_kv_store_saves_skipped_total",
    "store_saves_already_stored": "vllm:pd_kv_store_saves_already_stored_total",
    "store_save_failures": "vllm:pd_kv_store_save_failures_total",
    "itl_sum_s": "vllm:inter_token_latency_seconds_sum",
    "itl_count": "vllm:inter_token_latency_seconds_count",
}


STORE_HISTOGRAMS = tuple(f"vllm:pd_kv_store_{kind}_seconds" for kind in ("lookup", "load", "save"))


def histogram_mean_ms(counters: dict[str, float], name: str) -> float:
    """The mean of a connector histogram over a phase (from its counters' deltas)."""
    count = counters.get(f"vllm:pd_kv_store_{name}_seconds_count", 0.0)
    total = counters.get(f"vllm:pd_kv_store_{name}_seconds_sum", 0.0)
    return 1000 * total / count if count else float("nan")


def histogram_quantile_ms(counters: dict[str, float], name: str, q: float) -> float:
    """The smallest bucket bound holding a share ``q`` of a phase's observations: an
    upper bound of the quantile."""
    prefix = f'vllm:pd_kv_store_{name}_seconds_bucket{{le="'
    buckets = sorted(
        (float(key[len(prefix) :].split('"')[0]), value)
        for key, value in counters.items()
        if key.startswith(prefix)
    )
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return 1000 * bound
    return float("nan")


def instance_counters(server: VllmServer) -> dict[str, float]:
    samples = server.metrics()
    counters = {key: samples.get(name, 0.0) for key, name in INSTANCE_COUNTERS.items()}
    # The connector's lookup, load and save latency histograms (sums, counts, buckets).
    for name, value in samples.items():
        if name.startswith(STORE_HISTOGRAMS):
            counters[name] = value
    return counters


def store_counters(store: dict[str, Any] | None) -> dict[str, float]:
    """Blocks each tier of the store process returned (``get`` hits) and what it holds."""
    if store is None:
        return {}
    config = StoreConfig.from_dict(store)
    if ping(config, timeout_ms=2000) is None:  # never start one just to read it
        return {}
    client = StoreClient(config, start_wait_s=5)
    try:
        stats = client.stats()
    finally:
        client.close()
    if stats is None:
        return {}
    counters: dict[str, float] = {"lookups": stats.lookups, "promotions": stats.promotions}
    for tier in (stats.host, stats.disk):
        if tier is not None:
            counters[f"{tier.tier}_hit_tokens"] = tier.hits * BLOCK_SIZE
            counters[f"{tier.tier}_entries"] = tier.entries
            counters[f"{tier.tier}_puts"] = tier.puts
            counters[f"{tier.tier}_usage_bytes"] = tier.usage_bytes
            counters[f"{tier.tier}_evictions"] = tier.evictions
            counters[f"{tier.tier}_recovered_entries"] = tier.recovered_entries
    return counters


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters grown between two readings (usage and entry counts: the later value)."""
    levels = ("_entries", "_usage_bytes", "_recovered_entries")
    return {
        key: value if key.endswith(levels) else value - before.get(key, 0.0)
        for key, value in after.items()
    }
