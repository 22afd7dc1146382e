"""Run a scenario on a running pd-serve, then restore the cluster and audit what the fault
left behind: every instance continued and in rotation, no KV blocks held on any
instance, no proxy connections beyond the idle baseline."""

from __future__ import annotations

import asyncio
import time
import traceback

import httpx

from pd.serve_process import PdServeProcess

from .bounds import CONNECTION_TOLERANCE, REJOIN_S, SETTLE_S
from .client import completion_body, http_client, send
from .probes import health, kv_blocks_used, wait_until
from .results import Abort, Scenario, ScenarioResult


async def run_scenario(
    serve: PdServeProcess, scenario: Scenario, baseline_connections: int, name: str | None = None
) -> ScenarioResult:
    """Run one scenario, then restore the cluster and check what the fault left behind."""
    result = ScenarioResult(name or scenario.__name__, " ".join((scenario.__doc__ or "").split()))
    started = time.monotonic()
    async with http_client() as http:
        try:
            await scenario(serve, http, result)
        except Abort:
            pass
        except Exception:
            result.check("scenario ran to its end", False, traceback.format_exc()[-2000:])
        finally:
            serve.resume_all()
        await _restore_and_audit(serve, http, result, baseline_connections)
    result.elapsed_s = time.monotonic() - started
    return result


async def _restore_and_audit(
    serve: PdServeProcess,
    http: httpx.AsyncClient,
    result: ScenarioResult,
    baseline_connections: int,
) -> None:
    async def ready() -> bool:
        return (await health(serve, http))["status"] == "ok"  # both roles in rotation

    ok, last, took = await wait_until("cluster ready", ready, REJOIN_S, interval_s=1)
    if not result.check("cluster serving again afterwards", ok, f"{took:.0f}s, last {last!r}"):
        return
    # No KV blocks held anywhere once nothing runs: leases released or expired
    # (bounded by lease_timeout_s), requests finished or aborted.
    bound = float(serve.connector["lease_timeout_s"]) + SETTLE_S
    for name, inst in sorted(serve.instances().items()):

        async def drained(inst=inst) -> bool:
            return await kv_blocks_used(inst, http) == 0

        ok, _, took = await wait_until(f"{name} holds no KV", drained, bound, interval_s=0.5)
        blocks = await kv_blocks_used(inst, http) if not ok else 0
        result.stranded_blocks[name] = blocks
        result.check(
            f"no KV blocks stranded on {name}", ok, f"{blocks} blocks still held after {took:.0f}s"
        )
    # Idle keep-alive connections expire after 5 s; leaked ones never do.
    limit = baseline_connections + CONNECTION_TOLERANCE

    async def closed() -> bool:
        return serve.proxy_connections() <= limit

    ok, _, _ = await wait_until("connections closed", closed, SETTLE_S, interval_s=1)
    after = serve.proxy_connections()
    result.connections = (baseline_connections, after)
    result.check(
        "no leaked proxy connections",
        ok,
        f"{after} open, baseline {baseline_connections} (+{CONNECTION_TOLERANCE} allowed)",
    )


async def quiet_connections(serve: PdServeProcess) -> int:
    """The proxy's connection count once idle keep-alive connections have expired."""
    await asyncio.sleep(8)
    return serve.proxy_connections()


async def warm_up(serve: PdServeProcess) -> int:
    """Use every instance once (plain and streamed), then return the idle proxy's
    connection count: the baseline every scenario's audit compares with."""
    serve.instances()  # learn the instances' ports
    async with http_client() as http:
        for stream in (False, True):
            outcome = await send(http, serve.url, completion_body(stream=stream), 120)
            if outcome.kind != "completed":
                raise RuntimeError(f"warm-up request failed: {outcome}")
    return await quiet_connections(serve)


# Each scenario: the fault, the requests around it, what must hold. Deadlines are upper
# bounds ("never hangs"), not speed expectations.
