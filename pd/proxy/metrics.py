"""The proxy's serving metrics: Prometheus on ``/metrics``, and Ray's metrics too.

Latency histograms and request counters are recorded once through ``ProxyMetrics``,
which writes to a Prometheus registry of its own and, when the proxy runs inside a
Ray driver, mirrors them with ``ray.util.metrics`` so they appear in the Ray
dashboard's metrics view. KV transfer figures are read from the instances' own
``/metrics`` (pd's connector exports them there) when ``/metrics`` is scraped, each
read bounded by ``SCRAPE_TIMEOUT_S``; the KV store's figures from the same reads are
summed over the cluster (``pd.proxy.store_metrics``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_events import FeedStats
from pd.proxy.kv_index import KVIndex
from pd.proxy.store_metrics import StoreMetricsAggregate
from pd.vllm_server import parse_prometheus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OWN_TIME_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
# The longest /metrics waits for one instance's: a hung instance costs this, no more.
SCRAPE_TIMEOUT_S = 2.0
# Connector counters summed per instance on the proxy's /metrics.
KV_COUNTERS = (
    "transfers",
    "transfer_failures",
    "bytes_received",
    "blocks_received",
    "leases_expired",
    "bytes_sent",
)


class ProxyMetrics:
    def __init__(self, pool: InstancePool) -> None:
        self._pool = pool
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pd_requests", "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "pd_time_to_first_token_seconds", "Time to first streamed token",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "pd_inter_token_latency_seconds", "Time between streamed chunks",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "pd_e2e_request_latency_seconds", "End-to-end request latency",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.prefill = Histogram(
            "pd_prefill_seconds", "Duration of the prefill leg",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.proxy_overhead = Histogram(
            "pd_proxy_overhead_seconds",
            "The proxy's own time per request before its legs are sent (parsing, "
            "validation, routing; plus the hop between the legs when they run in turn)",
            buckets=OWN_TIME_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "pd_prefill_fallbacks", "Requests decode prefilled itself (prefill unavailable)",
            registry=r,
        )  # fmt: skip
        self.routing_decisions = Counter(
            "pd_routing_decisions",
            "Routes chosen, by decision: prefill (both legs), decode_only (the policy left "
            "prefill out), no_prefill (none in rotation)",
            ["decision"], registry=r,
        )  # fmt: skip
        self.routing = Histogram(
            "pd_routing_seconds", "The routing policy's own time per request (tokenizing "
            "and hashing the prompt included)", buckets=OWN_TIME_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.routing_cpu = Histogram(
            "pd_routing_cpu_seconds", "The CPU time of pd_routing_seconds on the proxy's "
            "event loop thread (the rest of its wall time: waiting for a core, or for a "
            "tokenizing thread)", buckets=OWN_TIME_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.routing_tokenize = Histogram(
            "pd_routing_tokenize_seconds", "Of pd_routing_seconds, tokenizing the prompt "
            "(policies that route by token ids)", buckets=OWN_TIME_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.kv_index_blocks = Gauge(
            "pd_kv_index_blocks", "Block hashes the proxy's KV index holds per instance "
            "(routing: kv_aware)", ["instance", "role"], registry=r,
        )  # fmt: skip
        self.kv_events = Gauge(
            "pd_kv_events", "The proxy's KV event feeds (routing: kv_aware), per instance: "
            "batches applied, gaps, resyncs, drops, hash_mismatches (since pd-serve started)",
            ["instance", "kind"], registry=r,
        )  # fmt: skip
        self.first_tokens = Counter(
            "pd_first_token_handoffs",
            "Streamed requests whose first token came from the prefill leg (first-token flow)",
            registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "pd_instance_inflight_requests", "Requests in flight per instance",
            ["instance", "role"], registry=r,
        )  # fmt: skip
        self.healthy = Gauge(
            "pd_instance_healthy", "1 when the instance is in rotation",
            ["instance", "role"], registry=r,
        )  # fmt: skip
        self.kv = {
            name: Gauge(
                f"pd_kv_{name}",
                f"Connector counter vllm:pd_kv_{name}_total, per instance",
                ["instance", "role"],
                registry=r,
            )
            for name in KV_COUNTERS
        }
        self.store = StoreMetricsAggregate()
        r.register(self.store)
        self._ray = _RayMirror.create()

    def observe_request(self, endpoint: str, status: int, e2e_s: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.e2e.observe(e2e_s)
        self._ray.observe_request(endpoint, status, e2e_s)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self._ray.observe("ttft", seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self._ray.observe("itl", seconds)

    async def render(
        self,
        http: httpx.AsyncClient,
        kv_index: KVIndex | None = None,
        kv_feeds: dict[str, FeedStats] | None = None,
    ) -> bytes:
        """Refresh per-instance gauges (KV counters scraped from instances) and render."""
        for name, stats in (kv_feeds or {}).items():
            for kind, value in asdict(stats).items():
                self.kv_events.labels(name, kind).set(value)
        instances = list(self._pool.instances.values())
        for inst in instances:
            self.inflight.labels(inst.name, inst.role).set(inst.inflight_requests)
            self.healthy.labels(inst.name, inst.role).set(1 if inst.healthy else 0)
            if kv_index is not None:
                self.kv_index_blocks.labels(inst.name, inst.role).set(kv_index.size(inst.name))

        async def scrape(inst: Instance) -> None:
            if not (inst.healthy and inst.url):
                return
            try:
                # httpx's timeout bounds each phase; this bounds the whole read.
                async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                    response = await http.get(f"{inst.url}/metrics", timeout=SCRAPE_TIMEOUT_S)
            except (httpx.HTTPError, TimeoutError):
                return
            if response.status_code != 200:
                return
            samples = parse_prometheus(response.text)
            for name, gauge in self.kv.items():
                gauge.labels(inst.name, inst.role).set(samples.get(f"vllm:pd_kv_{name}_total", 0))
            try:
                self.store.update(inst.name, response.text)
            except ValueError as e:  # unparsable: keep its last answer
                logger.debug("store metrics of %s unreadable: %s", inst.name, e)

        await asyncio.gather(*(scrape(i) for i in instances))
        self.store.keep_only(i.name for i in instances)
        return generate_latest(self.registry)


class _RayMirror:
    """The same figures through ``ray.util.metrics`` (shown in the Ray dashboard)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        if not enabled:
            return
        from ray.util import metrics

        boundaries = list(LATENCY_BUCKETS_S)
        self._requests = metrics.Counter(
            "pd_proxy_requests", "Requests answered by pd's proxy", ("endpoint", "status")
        )
        self._histograms = {
            "e2e": metrics.Histogram("pd_proxy_e2e_latency_seconds", "", boundaries),
            "ttft": metrics.Histogram("pd_proxy_ttft_seconds", "", boundaries),
            "itl": metrics.Histogram("pd_proxy_itl_seconds", "", boundaries),
        }

    @classmethod
    def create(cls) -> _RayMirror:
        try:
            import ray

            return cls(enabled=ray.is_initialized())
        except Exception:  # ray missing or not usable: Prometheus alone
            logger.debug("Ray metrics disabled", exc_info=True)
            return cls(enabled=False)

    def observe_request(self, endpoint: str, status: int, e2e_s: float) -> None:
        if self._enabled:
            self._requests.inc(1, {"endpoint": endpoint, "status": str(status)})
            self._histograms["e2e"].observe(e2e_s)

    def observe(self, name: str, seconds: float) -> None:
        if self._enabled:
            self._histograms[name].observe(seconds)
