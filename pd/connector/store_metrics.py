"""The node's KV store process's own figures on an instance's ``/metrics``.

The connector's counters (``pd.transfer.stats``) say what this instance asked of the
store and got. What only the store process knows, each tier's size, usage, entries,
evictions, corrupt entries dropped, its block reads and writes and their latency, is
read from it (``read_stats``, bounded, never starting a store) when ``/metrics`` is
scraped, by ``StoreStatsCollector`` in vLLM's API server process.

Every sample here carries a ``store`` label (host name and socket directory): the
instances of a node share one store, so a reader summing over instances (pd's proxy)
counts each ``store`` once. The scrape never waits on the store longer than
``refresh_wait_s``: a thread reads it, and a scrape it cannot serve in time gets the
previous reading (the first scrape, having none, waits up to one read's timeout).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from pd.store.client import read_stats
from pd.store.config import StoreConfig
from pd.store.stats import StoreStats, TierStats

PREFIX = "vllm:pd_kv_store_"
# TierStats fields exported as gauges and as counters: name -> help text.
TIER_GAUGES = {
    "capacity_bytes": "the tier's size cap in bytes",
    "usage_bytes": "bytes the tier holds now",
    "entries": "blocks the tier holds now",
    "recovered_entries": "blocks the disk tier found at the store's start-up",
}
TIER_COUNTERS = {
    "hits": "block reads the tier answered",
    "misses": "block reads the tier could not answer",
    "puts": "blocks the tier accepted",
    "bytes_stored": "bytes written into the tier",
    "bytes_loaded": "bytes read from the tier",
    "evictions": "blocks evicted to make room (LRU)",
    "evicted_bytes": "bytes evicted to make room",
    "refused_puts": "blocks refused for being larger than the whole tier",
    "failed_writes": "writes that failed (disk full, read-only, I/O error)",
    "corrupt_dropped": "torn, truncated or corrupt entries found, dropped and recomputed",
}
STORE_COUNTERS = {
    "lookups": "prefix lookups the store answered (every instance's)",
    "lookup_blocks": "blocks the store's lookups asked about",
    "promotions": "disk hits copied up into the host tier",
    "readahead_blocks": "disk-only blocks of a lookup's hit the store asked the kernel to "
    "read ahead",
}
LATENCY = {"get": "one block's read from the tier", "put": "one block's write into the tier"}
REFRESH_WAIT_S = 0.1
FIRST_READ_WAIT_CAP_S = 2.0  # a scrape never waits longer than this, even the first


class StoreStatsCollector(Collector):
    """Reads the store's stats off the scrape's path and exports them."""

    # vLLM's metric logger unregisters collectors whose _name starts with "vllm:" when
    # it is built again: so does this one.
    _name = "vllm:pd_kv_store_process"

    def __init__(
        self,
        config: StoreConfig,
        refresh_wait_s: float = REFRESH_WAIT_S,
        read_timeout_ms: int | None = None,
    ) -> None:
        self._config = config
        # The store's own deadline (timeout_ms): a store busy with saves answers late
        # but is up, and a shorter deadline here would call it down.
        read_timeout_ms = config.timeout_ms if read_timeout_ms is None else read_timeout_ms
        self.store_label = f"{socket.gethostname()}:{config.socket_dir}"
        self._refresh_wait_s = refresh_wait_s
        self._read_timeout_ms = read_timeout_ms
        self._cond = threading.Condition()
        self._asked = 0  # scrapes that asked for a reading
        self._read = 0  # the last scrape a reading answers
        self._stats: StoreStats | None = None
        self._thread: threading.Thread | None = None

    def describe(self) -> list[Metric]:
        return []  # registering must not read the store

    def collect(self) -> Iterator[Metric]:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._read_loop, name="pd-store-stats", daemon=True
                )
                self._thread.start()
            self._asked += 1
            asked = self._asked
            self._cond.notify_all()
            # The first scrape waits for a whole read: with no earlier reading to fall
            # back on, a short wait would report a live store as down.
            first_wait_s = min(self._read_timeout_ms / 1000 + 0.1, FIRST_READ_WAIT_CAP_S)
            wait_s = self._refresh_wait_s if self._read else first_wait_s
            self._cond.wait_for(lambda: self._read >= asked, timeout=wait_s)
            stats = self._stats
        yield from store_families(stats, self.store_label)

    def _read_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked > self._read)
                asked = self._asked
            stats = read_stats(self._config, self._read_timeout_ms)
            with self._cond:
                self._stats, self._read = stats, asked
                self._cond.notify_all()


def store_families(stats: StoreStats | None, store: str) -> Iterator[Metric]:
    """``stats`` as Prometheus families labelled ``store`` (and ``tier``); a store that
    did not answer is ``vllm:pd_kv_store_up 0`` alone."""
    up = GaugeMetricFamily(
        f"{PREFIX}up", "1 when the node's KV store answered the last read", labels=["store"]
    )
    up.add_metric([store], 1 if stats is not None else 0)
    yield up
    if stats is None:
        return
    tiers = [t for t in (stats.host, stats.disk) if t is not None]
    for name, doc in TIER_GAUGES.items():
        gauge = GaugeMetricFamily(f"{PREFIX}tier_{name}", doc, labels=["store", "tier"])
        for tier in tiers:
            gauge.add_metric([store, tier.tier], getattr(tier, name))
        yield gauge
    for name, doc in TIER_COUNTERS.items():
        counter = CounterMetricFamily(f"{PREFIX}tier_{name}", doc, labels=["store", "tier"])
        for tier in tiers:
            counter.add_metric([store, tier.tier], getattr(tier, name))
        yield counter
    yield _warnings(tiers, store)
    for name, doc in STORE_COUNTERS.items():
        counter = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["store"])
        counter.add_metric([store], getattr(stats, name))
        yield counter
    for op, doc in LATENCY.items():
        histogram = HistogramMetricFamily(
            f"{PREFIX}tier_{op}_seconds", f"duration of {doc}", labels=["store", "tier"]
        )
        for tier in tiers:
            snapshot = stats.latency.get(f"{tier.tier}_{op}")
            if snapshot is None:
                continue
            buckets = [(_le(bound), count) for bound, count in snapshot.cumulative()]
            histogram.add_metric([store, tier.tier], buckets, snapshot.sum)
        yield histogram


def _warnings(tiers: list[TierStats], store: str) -> Metric:
    counter = CounterMetricFamily(
        f"{PREFIX}tier_warnings",
        "warnings by kind (disk_full, read_only, corrupt_entry, ...)",
        labels=["store", "tier", "kind"],
    )
    for tier in tiers:
        for kind, count in sorted(tier.warnings.items()):
            counter.add_metric([store, tier.tier, kind], count)
    return counter


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


_registered: StoreStatsCollector | None = None
_registered_lock = threading.Lock()


def register_store_collector(
    config: StoreConfig, registry: CollectorRegistry = REGISTRY
) -> StoreStatsCollector:
    """Export ``config``'s store on ``registry`` (vLLM's, in its API server process);
    a second call replaces the first's collector."""
    global _registered
    with _registered_lock:
        if _registered is not None:
            with contextlib.suppress(KeyError):  # vLLM's clean-up unregistered it
                registry.unregister(_registered)
        _registered = StoreStatsCollector(config)
        registry.register(_registered)
        return _registered
