"""Connector statistics: counted on each worker, summed by vLLM, exported to Prometheus.

Workers count into a ``TransferCounters`` (thread-safe); each engine step vLLM asks
for a snapshot (``PDConnectorStats``), aggregates snapshots across workers and steps,
logs ``reduce()`` periodically and feeds ``PDPromMetrics.observe``. The Prometheus
names all start with ``vllm:pd_kv_`` and appear on vLLM's own ``/metrics``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

# name -> help text. Counters are summed when snapshots aggregate.
COUNTERS: dict[str, str] = {
    "transfers": "KV loads completed by this decode instance",
    "transfers_via_nixl": "KV loads that read over NIXL",
    "transfers_via_zmq": "KV loads that read over ZMQ+TCP",
    "transfer_failures": "KV loads that failed (the prompt was recomputed instead)",
    "transfers_held": "failed KV loads whose read was still in flight at the deadline (its "
    "blocks held until it ended)",
    "transfers_quarantined": "held KV loads whose read had not ended a minute after the "
    "deadline (its blocks kept from reuse for as long as it lasts)",
    "handshake_failures": "handshakes with a prefill instance that failed",
    "blocks_received": "KV blocks loaded from prefill instances",
    "bytes_received": "KV bytes loaded from prefill instances",
    "leases_granted": "requests whose KV blocks were held for a decode instance",
    "leases_released": "leases ended by the decode instance",
    "leases_expired": "leases that expired unclaimed (blocks freed)",
    "blocks_sent": "KV blocks read by decode instances",
    "bytes_sent": "KV bytes read by decode instances",
    "store_hit_tokens": "prompt tokens beyond the prefix cache found in the node's KV store",
    "store_miss_tokens": "prompt tokens beyond the prefix cache the KV store lacked",
    "store_blocks_loaded": "KV blocks loaded from the node's KV store",
    "store_bytes_loaded": "KV bytes loaded from the node's KV store",
    "store_load_failures": "KV blocks whose store load failed (recomputed instead)",
    "store_blocks_stored": "KV blocks saved to the node's KV store",
    "store_bytes_stored": "KV bytes saved to the node's KV store",
    "store_save_failures": "KV blocks the store did not accept",
    "store_saves_skipped": "KV blocks not saved because a save queue was full",
    "store_saves_already_stored": "KV blocks a save found already in the store (not sent)",
}
# The node's KV store tiers, in the order a lookup and a load try them.
STORE_TIERS = ("host", "disk")
# name -> help text; one counter per tier (label ``tier``), summed like COUNTERS. A
# tier's misses are the tokens neither it nor a tier before it held, so per tier
# hits + misses = what reached it (host: every token looked up).
TIER_COUNTERS: dict[str, str] = {
    "store_tier_hit_tokens": "prompt tokens a KV store lookup found, by the tier a load reads",
    "store_tier_miss_tokens": "prompt tokens a KV store lookup found neither in the tier "
    "nor in one before it",
}
# name -> help text. Samples are concatenated when snapshots aggregate.
SAMPLES: dict[str, str] = {
    "transfer_seconds": "duration of one request's KV load, handshake included",
    "store_lookup_seconds": "duration of one request's KV store lookup, hit or miss "
    "(the scheduler waits for it)",
    "store_load_seconds": "duration of one request's load from the KV store (read and "
    "copied into the KV cache)",
    "store_save_seconds": "duration of one request's save to the KV store (copied out of "
    "the KV cache and stored)",
}
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# A lookup that misses should cost well under a millisecond: finer buckets there.
LOOKUP_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5)
SAMPLE_BUCKETS: dict[str, tuple[float, ...]] = {"store_lookup_seconds": LOOKUP_BUCKETS_S}


def tier_key(name: str, tier: str) -> str:
    """The ``data`` key of one tier's counter ``name``."""
    return f"{name}:{tier}"


_TIER_KEYS = tuple(tier_key(n, t) for n in TIER_COUNTERS for t in STORE_TIERS)
_SUMMED = (*COUNTERS, *_TIER_KEYS)


def _empty() -> dict[str, Any]:
    return {**{name: 0 for name in _SUMMED}, **{name: [] for name in SAMPLES}}


@dataclass
class PDConnectorStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=_empty)

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in _SUMMED:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        for name in SAMPLES:
            self.data[name] = [*self.data.get(name, []), *other.data.get(name, [])]
        return self

    def reduce(self) -> dict[str, int | float]:
        summary: dict[str, int | float] = {
            name: self.data.get(name, 0) for name in _SUMMED if self.data.get(name, 0)
        }
        for name in ("store_lookup_seconds", "store_load_seconds", "store_save_seconds"):
            samples = self.data.get(name, [])
            if samples:
                summary[f"avg_{name.removesuffix('_seconds')}_ms"] = round(
                    1000 * sum(samples) / len(samples), 3
                )
        seconds = self.data.get("transfer_seconds", [])
        if seconds:
            summary["avg_transfer_ms"] = round(1000 * sum(seconds) / len(seconds), 3)
            total_s = sum(seconds)
            if total_s > 0:
                summary["throughput_MBps"] = round(
                    self.data.get("bytes_received", 0) / total_s / 1e6, 1
                )
        return summary

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in (*_SUMMED, *SAMPLES))


class TransferCounters:
    """What one worker counts between two snapshots. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = _empty()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._data[name] += value

    def observe(self, **samples: float) -> None:
        with self._lock:
            for name, value in samples.items():
                self._data[name].append(value)

    def snapshot(self) -> PDConnectorStats | None:
        """Everything counted since the last snapshot, or None if nothing was."""
        with self._lock:
            data, self._data = self._data, _empty()
        stats = PDConnectorStats(data=data)
        return None if stats.is_empty() else stats


class PDPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        from vllm.v1.metrics.utils import create_metric_per_engine

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # vLLM types its metric classes and children as a union of all metric kinds.
        histogram_cls = cast("type[Histogram]", self._histogram_cls)
        self._counters: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                self._counter_cls(
                    name=f"vllm:pd_kv_{name}", documentation=doc, labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self._histograms: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                histogram_cls(
                    name=f"vllm:pd_kv_{name}",
                    documentation=doc,
                    labelnames=labelnames,
                    buckets=list(SAMPLE_BUCKETS.get(name, LATENCY_BUCKETS_S)),
                ),
                per_engine_labelvalues,
            )
            for name, doc in SAMPLES.items()
        }
        # (data key) -> per-engine child of the tier's counter
        self._tier_counters: dict[str, dict[int, Any]] = {}
        for name, doc in TIER_COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:pd_kv_{name}", documentation=doc, labelnames=[*labelnames, "tier"]
            )
            for tier in STORE_TIERS:
                self._tier_counters[tier_key(name, tier)] = {
                    idx: counter.labels(*values, tier)
                    for idx, values in per_engine_labelvalues.items()
                }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, per_engine in (*self._counters.items(), *self._tier_counters.items()):
            value = transfer_stats_data.get(name, 0)
            if value:
                per_engine[engine_idx].inc(value)
        for name, per_engine in self._histograms.items():
            for sample in transfer_stats_data.get(name, []):
                per_engine[engine_idx].observe(sample)
