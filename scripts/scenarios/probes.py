"""What a scenario reads from a running pd-serve (health, metrics, logs, its instances'
vLLM servers), and the waits and checks built on those readings."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from pd.serve_process import PdServeProcess, VllmInstance
from pd.vllm_server import parse_prometheus

from .bounds import PROXY_SLACK_S, REJOIN_S
from .client import completion_body, send
from .results import Abort, ScenarioResult


async def health(serve: PdServeProcess, http: httpx.AsyncClient) -> dict[str, Any]:
    """The proxy's /health answer, with its HTTP status as ``http_status``."""
    response = await http.get(f"{serve.url}/health", timeout=5)
    return {"http_status": response.status_code, **response.json()}


async def proxy_metrics(serve: PdServeProcess, http: httpx.AsyncClient) -> dict[str, float]:
    return parse_prometheus((await http.get(f"{serve.url}/metrics", timeout=10)).text)


async def instance_metrics(instance: VllmInstance, http: httpx.AsyncClient) -> dict[str, float]:
    response = await http.get(f"{instance.url}/metrics", timeout=10)
    return parse_prometheus(response.text)


async def kv_blocks_used(instance: VllmInstance, http: httpx.AsyncClient) -> int:
    """KV blocks held (running requests, leases), from vLLM's own /metrics."""
    text = (await http.get(f"{instance.url}/metrics", timeout=10)).text
    usage = parse_prometheus(text)["vllm:kv_cache_usage_perc"]
    match = re.search(r'num_gpu_blocks="(\d+)"', text)
    total = int(match.group(1)) if match else 0
    return round(usage * total) if total else (0 if usage == 0 else -1)


def blamed(serve: PdServeProcess, name: str, since: int) -> list[str]:
    """pd-serve's output lines since byte ``since`` in which the proxy took ``name`` out of
    rotation because a request on it failed (not because its health check did)."""
    with open(serve.log_path, "rb") as log:
        log.seek(since)
        lines = log.read().decode(errors="replace").splitlines()
    marker = f"{name} out of rotation: "
    return [
        line
        for line in lines
        if marker in line and "health check failed" not in line.split(marker, 1)[1]
    ]


async def wait_until(
    what: str, probe: Callable[[], Awaitable[Any]], timeout_s: float, interval_s: float = 0.25
) -> tuple[bool, Any, float]:
    """Poll ``probe`` until it returns something truthy; (ok, last value, seconds)."""
    started = time.monotonic()
    value: Any = None
    while True:
        try:
            value = await probe()
        except (httpx.HTTPError, KeyError, ValueError) as e:
            value = e
        else:
            if value:
                return True, value, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return False, value, time.monotonic() - started
        await asyncio.sleep(interval_s)


async def role_count(serve: PdServeProcess, http: httpx.AsyncClient, role: str) -> int:
    return (await health(serve, http))[role]


async def wait_role_count(
    serve: PdServeProcess,
    http: httpx.AsyncClient,
    result: ScenarioResult,
    role: str,
    count: int,
    timeout_s: float,
    what: str,
) -> float:
    async def probe() -> bool:
        return await role_count(serve, http, role) == count

    ok, last, took = await wait_until(what, probe, timeout_s)
    result.require(what, ok, f"after {took:.1f}s (bound {timeout_s:.0f}s; last {last!r})")
    return took


async def healthy_gauge(serve: PdServeProcess, http: httpx.AsyncClient, name: str) -> float:
    role = "prefill" if "prefill" in name else "decode"
    return (await proxy_metrics(serve, http))[
        f'pd_instance_healthy{{instance="{name}",role="{role}"}}'
    ]


async def wait_instance(
    serve: PdServeProcess, name: str, timeout_s: float = REJOIN_S
) -> VllmInstance:
    async def probe() -> VllmInstance | None:
        return serve.instances().get(name)

    ok, inst, _ = await wait_until(f"{name} running", probe, timeout_s, interval_s=1)
    if not ok:
        raise Abort(f"{name} has no vLLM server after {timeout_s:.0f}s")
    return inst


async def prefill_busy(serve: PdServeProcess, http: httpx.AsyncClient) -> bool:
    """Whether the proxy has a prefill leg in flight on pd-prefill-0."""
    metrics = await proxy_metrics(serve, http)
    return metrics['pd_instance_inflight_requests{instance="pd-prefill-0",role="prefill"}'] > 0


async def kv_transfers(serve: PdServeProcess, http: httpx.AsyncClient) -> tuple[float, float]:
    """(decode instances' completed KV loads, proxy's prefill fallbacks), summed."""
    metrics = await proxy_metrics(serve, http)
    loads = sum(v for k, v in metrics.items() if k.startswith("pd_kv_transfers{"))
    return loads, metrics.get("pd_prefill_fallbacks_total", 0.0)


async def check_served_with_transfer(
    serve: PdServeProcess, http: httpx.AsyncClient, result: ScenarioResult, what: str, n: int = 3
) -> None:
    """``n`` requests after the fault all complete, each with a KV load from prefill."""
    loads_before, fallbacks_before = await kv_transfers(serve, http)
    outcomes = [
        await send(
            http,
            serve.url,
            completion_body(300, 8, stream=i % 2 == 1),
            serve.request_s + PROXY_SLACK_S,
        )
        for i in range(n)
    ]
    result.outcomes += outcomes
    result.check(
        f"{what}: requests complete",
        all(o.kind == "completed" for o in outcomes),
        "; ".join(f"{o.kind} {o.status} {o.detail[:120]}" for o in outcomes),
    )
    loads_after, fallbacks_after = await kv_transfers(serve, http)
    result.check(
        f"{what}: KV moved from prefill to decode for each",
        loads_after - loads_before == n and fallbacks_after == fallbacks_before,
        f"KV loads +{loads_after - loads_before:g} for {n} requests, "
        f"prefill fallbacks +{fallbacks_after - fallbacks_before:g}",
    )


def check_not_blamed(serve: PdServeProcess, r: ScenarioResult, name: str, since: int) -> None:
    """The instance that did nothing wrong stays in rotation."""
    lines = blamed(serve, name, since)
    r.check(
        f"{name}, which kept working, is not taken out of rotation for the fault",
        not lines,
        " | ".join(line[-200:] for line in lines[:3]),
    )
