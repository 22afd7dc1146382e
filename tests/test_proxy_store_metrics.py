"""The proxy's cluster-wide KV store figures: ``ProxyMetrics.render`` reads real HTTP
``/metrics`` endpoints on loopback serving what instances serve (pd's connector metrics
and the store process's figures, rendered by the real exporters), sums what is each
instance's own, counts a node's shared store once, and never waits on a slow instance
longer than its bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pd.connector.store_metrics import store_families
from pd.proxy import metrics as proxy_metrics
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.metrics import ProxyMetrics
from pd.store.stats import HistogramSnapshot, StoreStats, TierStats
from pd.transfer.stats import TransferCounters, tier_key
from tests.test_store_metrics import prom_metrics

Samples = dict[tuple[str, frozenset], float]


def instance_text(hit_host: int, lookups: list[float], store: str, evictions: int) -> str:
    """One instance's /metrics: its connector counters, its node store's figures."""
    registry = CollectorRegistry()
    counters = TransferCounters()
    counters.add(**{tier_key("store_tier_hit_tokens", "host"): hit_host}, store_hit_tokens=hit_host)
    for seconds in lookups:
        counters.observe(store_lookup_seconds=seconds)
    stats = counters.snapshot()
    assert stats is not None
    prom_metrics(registry).observe(stats.data)
    host = TierStats(
        "host", capacity_bytes=10_000, usage_bytes=100 * evictions, evictions=evictions
    )
    node = StoreStats(
        host=host,
        disk=None,
        latency={"host_get": HistogramSnapshot((0.001,), (evictions, 1), 0.5)},
    )

    class Store:
        def collect(self):  # type: ignore[no-untyped-def]
            return store_families(node, store)

    registry.register(Store())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return text + "vllm:num_requests_running 3.0\n"  # vLLM's own: not the proxy's business


class Upstreams:
    """Loopback HTTP servers standing in for instances' /metrics."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.stop = threading.Event()
        upstreams = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.strip("/").split("/")[0]
                upstreams.answers[name](self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def serve_text(self, name: str, text: str, status: int = 200) -> None:
        def answer(handler: BaseHTTPRequestHandler) -> None:
            body = text.encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        self.answers[name] = answer

    def serve_dribble(self, name: str) -> None:
        """Headers, then a byte now and then, never the end: no per-read timeout fires."""

        def answer(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Length", "1000000")
            handler.end_headers()
            while not self.stop.wait(0.1):
                try:
                    handler.wfile.write(b"#")
                    handler.wfile.flush()
                except OSError:
                    return

        self.answers[name] = answer

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    u = Upstreams()
    yield u
    u.close()


def parse(text: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) == ls]
    assert len(matches) == 1, (name, labels, sorted(k for k in samples if k[0] == name))
    return matches[0]


def render(metrics: ProxyMetrics) -> Samples:
    async def go() -> bytes:
        async with httpx.AsyncClient() as http:
            return await metrics.render(http)

    return parse(asyncio.run(go()))


def test_store_figures_are_summed_over_instances_and_shared_stores_counted_once(
    upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_metrics, "SCRAPE_TIMEOUT_S", 1.0)
    # Two instances on node h1 share its store (b read it later: more evictions), one on h2.
    upstreams.serve_text("a", instance_text(128, [0.0002], "h1:/s", evictions=2))
    upstreams.serve_text("b", instance_text(256, [0.0003, 0.02], "h1:/s", evictions=3))
    upstreams.serve_text("c", instance_text(512, [0.0004], "h2:/s", evictions=1))
    upstreams.serve_dribble("slow")
    instances = [
        Instance("a", "prefill", upstreams.url("a"), healthy=True),
        Instance("b", "decode", upstreams.url("b"), healthy=True),
        Instance("c", "decode", upstreams.url("c"), healthy=True),
        Instance("slow", "decode", upstreams.url("slow"), healthy=True),
        Instance("down", "decode", upstreams.url("down"), healthy=False),  # not asked
    ]

    async def pool_and_render() -> tuple[ProxyMetrics, Samples, float]:
        async with httpx.AsyncClient() as http:
            metrics = ProxyMetrics(InstancePool(instances, http))
            started = time.monotonic()
            # Bounded here too: without the scrape's own bound this fails, not hangs.
            text = await asyncio.wait_for(metrics.render(http), 30)
            return metrics, parse(text), time.monotonic() - started

    metrics, samples, elapsed = asyncio.run(pool_and_render())
    # The dribbling instance would hold a read forever: the scrape's bound ends it.
    assert elapsed < 15

    # Each instance's own: summed, vLLM's model_name and engine labels gone.
    assert value(samples, "pd_kv_store_tier_hit_tokens_total", tier="host") == 128 + 256 + 512
    assert value(samples, "pd_kv_store_hit_tokens_total") == 896
    assert value(samples, "pd_kv_store_lookup_seconds_count") == 4
    assert value(samples, "pd_kv_store_lookup_seconds_sum") == pytest.approx(0.0209)
    assert value(samples, "pd_kv_store_lookup_seconds_bucket", le="0.00025") == 1
    assert value(samples, "pd_kv_store_lookup_seconds_bucket", le="0.0005") == 3
    assert value(samples, "pd_kv_store_lookup_seconds_bucket", le="+Inf") == 4
    # A node's store: once per store label, the freshest (highest) report.
    assert value(samples, "pd_kv_store_tier_evictions_total", store="h1:/s", tier="host") == 3
    assert value(samples, "pd_kv_store_tier_evictions_total", store="h2:/s", tier="host") == 1
    assert value(samples, "pd_kv_store_tier_usage_bytes", store="h1:/s", tier="host") == 300
    assert value(samples, "pd_kv_store_up", store="h1:/s") == 1
    assert value(samples, "pd_kv_store_tier_get_seconds_count", store="h1:/s", tier="host") == 4
    assert not any(name.startswith("pd_kv_store_") and "created" in name for name, _ in samples)
    assert not any("num_requests_running" in name for name, _ in samples)

    # An instance that fails a scrape keeps its last answer: no dip in a cluster counter.
    upstreams.serve_text("c", "oops", status=500)
    again = render(metrics)
    assert value(again, "pd_kv_store_tier_hit_tokens_total", tier="host") == 896
    # One that leaves the pool is forgotten.
    del metrics._pool.instances["c"]
    gone = render(metrics)
    assert value(gone, "pd_kv_store_tier_hit_tokens_total", tier="host") == 128 + 256
    assert not any(dict(ls).get("store") == "h2:/s" for _, ls in gone)


def test_no_instance_with_a_store_exports_no_store_family(upstreams: Upstreams) -> None:
    upstreams.serve_text("plain", "vllm:num_requests_running 0.0\n")

    async def go() -> Samples:
        async with httpx.AsyncClient() as http:
            pool = InstancePool([Instance("plain", "decode", upstreams.url("plain"), True)], http)
            return parse(await ProxyMetrics(pool).render(http))

    samples = asyncio.run(go())
    assert not any(name.startswith("pd_kv_store_") for name, _ in samples)
    assert value(samples, "pd_kv_transfers", instance="plain", role="decode") == 0
