"""The KV store's observability without an engine: the connector's store counters and
latency histograms (tier hits and misses in tokens, lookup, load and save times) as
vLLM's Prometheus export shows them, and the store process's own figures (tiers' usage,
evictions, corrupt entries, per-block latency) read from a real store process.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pd.connector.store_metrics import (
    StoreStatsCollector,
    register_store_collector,
    store_families,
)
from pd.connector.store_side import StoreScheduler, StoreWorker, lookup_counts
from pd.store import DiskTier, HostTier, PrefixHit, TieredStore
from pd.store.client import StoreClient, read_stats
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.store.stats import TIER_LATENCY_BUCKETS_S, LatencyHistogram
from pd.transfer.metadata import StoreBlocks
from pd.transfer.stats import (
    LOOKUP_BUCKETS_S,
    PDConnectorStats,
    PDPromMetrics,
    TransferCounters,
    tier_key,
)
from tests.harness.kv_layouts import BLOCK_SIZE, make_layout
from tests.store_helpers import block_hashes, keys, namespace, payload
from tests.test_store_connector import FakeRequest, results_until

NS = namespace(block_size=BLOCK_SIZE, kv_dtype="bfloat16", num_layers=3, head_dim=8)
BIG = 4 * 2**20  # two of these fill the 0.01 GiB host tier of the fixture's store


@pytest.fixture
def config(tmp_path: Path) -> Iterator[StoreConfig]:
    socket_dir = tempfile.mkdtemp(prefix="pdsm-", dir="/tmp")
    config = StoreConfig(
        host_gib=0.01, disk_path=str(tmp_path / "disk"), socket_dir=socket_dir, timeout_ms=3000
    )
    yield config
    pid = ping(config, 2000)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(socket_dir, ignore_errors=True)


def exported(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``registry`` as Prometheus text shows it: (name, labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def prom_metrics(registry: CollectorRegistry) -> PDPromMetrics:
    """pd's connector metrics as vLLM builds them, on a registry of the test's own."""
    types: Any = {c: functools.partial(c, registry=registry) for c in (Counter, Gauge, Histogram)}
    config: Any = SimpleNamespace(kv_transfer_config=None)
    return PDPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})


def test_a_lookup_counts_hits_and_misses_per_tier_in_tokens() -> None:
    counts = lookup_counts(10, PrefixHit(host_blocks=3, disk_blocks=2), block_size=16)
    assert counts == {
        "store_hit_tokens": 5 * 16,
        "store_miss_tokens": 5 * 16,
        tier_key("store_tier_hit_tokens", "host"): 3 * 16,
        tier_key("store_tier_miss_tokens", "host"): 7 * 16,  # went on to disk
        tier_key("store_tier_hit_tokens", "disk"): 2 * 16,
        tier_key("store_tier_miss_tokens", "disk"): 5 * 16,  # in no tier
    }
    assert lookup_counts(4, PrefixHit(0, 0), 16)[tier_key("store_tier_miss_tokens", "disk")] == 64


def test_snapshots_sum_tier_counters_and_keep_every_sample() -> None:
    a, b = TransferCounters(), TransferCounters()
    a.add(**{tier_key("store_tier_hit_tokens", "host"): 32})
    a.observe(store_lookup_seconds=0.0002)
    b.add(**{tier_key("store_tier_hit_tokens", "host"): 16}, store_saves_skipped=2)
    b.observe(store_lookup_seconds=0.0004, store_load_seconds=0.01)
    first, second = a.snapshot(), b.snapshot()
    assert first is not None and second is not None
    merged = first.aggregate(second)
    assert isinstance(merged, PDConnectorStats)
    assert merged.data[tier_key("store_tier_hit_tokens", "host")] == 48
    assert merged.data["store_lookup_seconds"] == [0.0002, 0.0004]
    summary = merged.reduce()
    assert summary["avg_store_lookup_ms"] == pytest.approx(0.3)
    assert summary["store_saves_skipped"] == 2
    assert a.snapshot() is None  # a snapshot takes what was counted
    only_tiers = TransferCounters()
    only_tiers.add(**{tier_key("store_tier_miss_tokens", "disk"): 16})
    assert only_tiers.snapshot() is not None  # tier counters alone are not "empty"


def test_scheduler_lookups_by_tier_and_their_latency_reach_prometheus(
    config: StoreConfig,
) -> None:
    hashes = block_hashes(6, seed="tiers")
    client = StoreClient(config)
    try:
        # 4 blocks of 4 MiB: the host tier keeps the last two, the disk all four.
        for h in hashes[:4]:
            assert client.put_many(NS, [(h, bytes(BIG))]) == 1
        assert client.lookup(NS, hashes) == PrefixHit(host_blocks=2, disk_blocks=2)
    finally:
        client.close()
    scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
    try:
        request = FakeRequest("t", num_tokens=6 * BLOCK_SIZE + 1, block_hashes=hashes)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (4 * BLOCK_SIZE, True)
        miss = FakeRequest("m", num_tokens=3 * BLOCK_SIZE + 1, block_hashes=block_hashes(3, "no"))
        assert scheduler.get_num_new_matched_tokens(miss, 0) == (0, False)
        stats = scheduler.counters.snapshot()
    finally:
        scheduler.close()
    assert stats is not None
    assert len(stats.data["store_lookup_seconds"]) == 2  # a miss is timed too

    registry = CollectorRegistry()
    prom_metrics(registry).observe(stats.data)
    samples = exported(registry)
    hit, miss_ = "vllm:pd_kv_store_tier_hit_tokens_total", "vllm:pd_kv_store_tier_miss_tokens_total"
    assert value(samples, hit, tier="host") == 2 * BLOCK_SIZE
    assert value(samples, hit, tier="disk") == 2 * BLOCK_SIZE
    assert value(samples, miss_, tier="host") == (4 + 3) * BLOCK_SIZE
    assert value(samples, miss_, tier="disk") == (2 + 3) * BLOCK_SIZE
    assert value(samples, "vllm:pd_kv_store_hit_tokens_total") == 4 * BLOCK_SIZE
    assert value(samples, "vllm:pd_kv_store_miss_tokens_total") == 5 * BLOCK_SIZE
    assert value(samples, "vllm:pd_kv_store_lookup_seconds_count", engine="0") == 2
    # The lookup histogram resolves below a millisecond.
    first_bound = str(LOOKUP_BUCKETS_S[0])
    assert ("vllm:pd_kv_store_lookup_seconds_bucket", first_bound) in {
        (n, dict(ls).get("le")) for n, ls in samples
    }


def test_worker_times_each_save_and_load(config: StoreConfig) -> None:
    hashes = block_hashes(3, seed="timed")
    layout, _ = make_layout(seed=4)
    counters = TransferCounters()
    worker = StoreWorker(StoreClient(config), NS, layout, counters, None)
    try:
        worker.submit([], [StoreBlocks("s", tuple(hashes), (1, 2, 3))])
        results_until(worker, lambda r: "s" in r.copied_saves)
        saved = PDConnectorStats()
        deadline = time.monotonic() + 30
        while not saved.data["store_save_seconds"]:  # the put follows the reported copy
            assert time.monotonic() < deadline, "the save was never timed"
            got = counters.snapshot()
            if got is not None:
                saved.aggregate(got)
            time.sleep(0.02)
        assert len(saved.data["store_save_seconds"]) == 1
        assert saved.data["store_blocks_stored"] == 3
        worker.submit([StoreBlocks("l", tuple(hashes), (7, 8, 9))], [])
        results_until(worker, lambda r: "l" in r.finished_loads)
        loaded = counters.snapshot()
        assert loaded is not None
        assert len(loaded.data["store_load_seconds"]) == 1
        assert loaded.data["store_blocks_loaded"] == 3
    finally:
        worker.close()


def test_latency_histogram_puts_each_sample_in_its_bucket() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 2.0):
        histogram.observe(seconds)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (2, 1, 1)  # a sample on a bound belongs to it (le)
    assert snapshot.count == 4
    assert snapshot.sum == pytest.approx(2.0065)
    assert snapshot.cumulative() == [(0.001, 2), (0.01, 3), (float("inf"), 4)]


def test_tiered_store_times_every_block_read_and_write_per_tier(tmp_path: Path) -> None:
    store = TieredStore(HostTier(2 * 1000), DiskTier(tmp_path / "d", 10**6))
    store.open()
    try:
        ks = keys(4, seed="lat")
        for k in ks:
            assert store.put(k, payload(k))
        for k in reversed(ks):  # the host tier holds the last two: two go on to disk
            assert store.get(k) == payload(k)
        latency = store.stats().latency
    finally:
        store.close()
    assert {name: h.count for name, h in latency.items()} == {
        "host_put": 4, "disk_put": 4, "host_get": 4, "disk_get": 2,
    }  # fmt: skip
    assert latency["disk_get"].bounds == TIER_LATENCY_BUCKETS_S
    assert latency["disk_put"].sum > 0
    host_only = TieredStore(HostTier(1000), None)
    assert set(host_only.stats().latency) == {"host_get", "host_put"}


def test_store_process_figures_on_metrics(config: StoreConfig) -> None:
    hashes = block_hashes(4, seed="collect")
    client = StoreClient(config)
    try:
        for h in hashes:  # the third evicts the first from the host tier
            assert client.put_many(NS, [(h, bytes(BIG))]) == 1
        assert client.get_many(NS, hashes[:1]) == [bytes(BIG)]  # read from disk
    finally:
        client.close()
    registry = CollectorRegistry()
    collector = register_store_collector(config, registry)
    samples = exported(registry)
    store = collector.store_label
    assert store.endswith(f":{config.socket_dir}")
    assert value(samples, "vllm:pd_kv_store_up", store=store) == 1
    gauge = "vllm:pd_kv_store_tier_"
    assert value(samples, f"{gauge}capacity_bytes", store=store, tier="host") == int(0.01 * 2**30)
    assert value(samples, f"{gauge}entries", tier="disk") == 4
    assert value(samples, f"{gauge}usage_bytes", tier="disk") > 4 * BIG
    assert value(samples, f"{gauge}usage_bytes", tier="host") == 2 * BIG  # after promotion
    assert value(samples, f"{gauge}evictions_total", tier="host") == 3  # 2 puts + promotion
    assert value(samples, f"{gauge}hits_total", tier="disk") == 1
    assert value(samples, f"{gauge}misses_total", tier="host") == 1
    assert value(samples, f"{gauge}bytes_loaded_total", tier="disk") == BIG
    assert value(samples, f"{gauge}corrupt_dropped_total", tier="disk") == 0
    assert value(samples, f"{gauge}put_seconds_count", tier="disk") == 4
    assert value(samples, f"{gauge}get_seconds_count", tier="host") == 1
    assert value(samples, f"{gauge}get_seconds_bucket", tier="disk", le="+Inf") == 1
    assert value(samples, "vllm:pd_kv_store_promotions_total") == 1

    # A second registration (vLLM rebuilds its loggers) replaces the first.
    again = register_store_collector(config, registry)
    assert again is not collector
    assert value(exported(registry), "vllm:pd_kv_store_up", store=store) == 1


def test_a_corrupt_entry_dropped_shows_on_metrics(config: StoreConfig) -> None:
    hashes = block_hashes(2, seed="rot")
    client = StoreClient(config)
    try:
        assert client.put_many(NS, [(h, b"x" * 1000) for h in hashes]) == 2
    finally:
        client.close()
    pid = ping(config, 2000)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # the host tier goes with it
    deadline = time.monotonic() + 30
    while ping(config, 200) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = next(Path(str(config.disk_path)).rglob(f"{hashes[0].hex()}.kv"))
    victim.write_bytes(victim.read_bytes()[:-10])  # torn
    client = StoreClient(config)
    try:
        assert client.get_many(NS, hashes) == [None, b"x" * 1000]
    finally:
        client.close()
    registry = CollectorRegistry()
    register_store_collector(config, registry)
    samples = exported(registry)
    assert value(samples, "vllm:pd_kv_store_tier_corrupt_dropped_total", tier="disk") == 1
    assert value(samples, "vllm:pd_kv_store_tier_recovered_entries", tier="disk") == 2
    assert (
        value(samples, "vllm:pd_kv_store_tier_warnings_total", tier="disk", kind="corrupt_entry")
        == 1
    )


def test_metrics_never_wait_on_a_store_that_does_not_answer(config: StoreConfig) -> None:
    # No store at all: down, and reading does not start one.
    assert read_stats(config, 200) is None
    assert value(exported_of(StoreStatsCollector(config)), "vllm:pd_kv_store_up") == 0
    assert ping(config, 200) is None

    # A socket that takes requests and never answers (a hung store).
    Path(str(config.socket_dir)).mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context()
    hung = ctx.socket(zmq.ROUTER)
    hung.bind(config.endpoint)
    try:
        collector = StoreStatsCollector(config, refresh_wait_s=0.1, read_timeout_ms=60_000)
        started = time.monotonic()
        for _ in range(3):
            assert value(exported_of(collector), "vllm:pd_kv_store_up") == 0
        # Each scrape waits refresh_wait_s at most, far from the read's 60 s.
        assert time.monotonic() - started < 20
        assert hung.poll(5000)  # the reading was sent, it just gets no answer
    finally:
        hung.close(linger=0)
        ctx.term()


def test_a_store_that_never_answered_exports_up_zero_alone() -> None:
    families = list(store_families(None, "h:/s"))
    assert [f.name for f in families] == ["vllm:pd_kv_store_up"]
    assert families[0].samples[0].value == 0


def exported_of(collector: StoreStatsCollector) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return exported(registry)
