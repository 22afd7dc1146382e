"""Instances that crash (SIGKILL) with requests in flight: the requests end (completed or
a clear error), the actor restarts, and the new instance rejoins the rotation."""

from __future__ import annotations

import asyncio
from functools import partial

import httpx

from pd.serve_process import PdServeProcess

from ..bounds import ENGINE_SLACK_S, REJOIN_S
from ..client import completion_body, send
from ..probes import (
    check_not_blamed,
    check_served_with_transfer,
    healthy_gauge,
    prefill_busy,
    wait_instance,
    wait_role_count,
    wait_until,
)
from ..results import ScenarioResult
from ..throttle import Throttle


async def prefill_killed_in_flight(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """Prefill's vLLM crashes (SIGKILL) with requests in flight: each completes (decode
    prefills itself) or fails with a clear error within a deadline; the actor restarts
    and rejoins the rotation by itself, and requests use the KV transfer again."""
    before = serve.instances()["pd-prefill-0"]
    since = serve.log_size()
    deadline_s = serve.request_s + ENGINE_SLACK_S
    bodies = [completion_body(1800, 32, stream=i % 2 == 0, chat=i % 3 == 0) for i in range(12)]
    tasks = [asyncio.create_task(send(http, serve.url, b, deadline_s)) for b in bodies]

    busy, _, _ = await wait_until("prefill busy", partial(prefill_busy, serve, http), 10, 0.02)
    before.kill()
    left = asyncio.create_task(
        wait_role_count(serve, http, r, "prefill", 0, 15, "the crashed prefill leaves rotation")
    )
    r.check("requests were in their prefill leg at the crash", busy)
    outcomes = await asyncio.gather(*tasks)
    r.outcomes += outcomes
    r.check(
        f"in-flight requests complete or fail clearly within request_s + {ENGINE_SLACK_S} s",
        all(o.kind in ("completed", "error") for o in outcomes),
        ", ".join(f"{o.kind}/{o.status}/{o.elapsed_s:.1f}s" for o in outcomes),
    )
    errors = [o for o in outcomes if o.kind == "error"]
    check_not_blamed(serve, r, "pd-decode-0", since)
    r.notes.append(
        f"in flight: {len(outcomes) - len(errors)} completed, {len(errors)} "
        f"clear errors ({', '.join(sorted({str(o.status) for o in errors}))})"
    )
    await left
    took = await wait_role_count(
        serve, http, r, "prefill", 1, REJOIN_S, "the restarted prefill rejoins rotation by itself"
    )
    r.notes.append(f"rejoined {took:.0f}s after leaving")
    r.check(
        "its pd_instance_healthy gauge is 1 again",
        await healthy_gauge(serve, http, "pd-prefill-0") == 1,
    )
    after = await wait_instance(serve, "pd-prefill-0")
    r.check(
        "a new vLLM server serves it",
        after.pid != before.pid and after.url != before.url,
        f"{before.url} (pid {before.pid}) -> {after.url} (pid {after.pid})",
    )
    await check_served_with_transfer(serve, http, r, "after the restart")


async def decode_killed_mid_stream(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """Decode's vLLM crashes (SIGKILL) mid-stream: each stream ends with an error event
    (no hang); the actor restarts and rejoins, and requests succeed again."""
    before = serve.instances()["pd-decode-0"]
    since = serve.log_size()
    bound = 60
    # Decode is throttled before the streams are sent, so that none can finish before
    # the kill however late this client gets to it.
    throttle = Throttle(before)
    throttle.start()
    started = [asyncio.Event() for _ in range(4)]
    streams = [
        asyncio.create_task(
            send(
                http,
                serve.url,
                completion_body(300, 1500, stream=True, chat=i == 0),
                bound,
                started[i].set,
            )
        )
        for i in range(4)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        waiting = asyncio.create_task(send(http, serve.url, completion_body(200, 1000), bound))
        await asyncio.sleep(0.5)
        # Held stopped, then killed: no window in which decode runs unthrottled.
        r.notes.append(await throttle.end(leave_stopped=True))
        before.kill()
    finally:
        if throttle.running:  # the streams did not all start: leave decode running
            r.notes.append(await throttle.end())
    left = asyncio.create_task(
        wait_role_count(serve, http, r, "decode", 0, 15, "the crashed decode leaves rotation")
    )
    outcomes = await asyncio.gather(*streams)
    r.outcomes += outcomes
    r.check(
        f"every stream ends with an error event within {bound}s",
        all(o.kind == "error" for o in outcomes),
        ", ".join(f"{o.kind}/{o.elapsed_s:.1f}s/{o.events} events" for o in outcomes),
    )
    outcome = await waiting
    r.outcomes.append(outcome)
    r.check(
        "a waiting (non-streamed) request gets a clear error",
        outcome.kind == "error",
        f"{outcome.kind} {outcome.status} {outcome.detail}",
    )
    check_not_blamed(serve, r, "pd-prefill-0", since)
    await left
    during = await send(http, serve.url, completion_body(200, 8, stream=True), 30)
    r.outcomes.append(during)
    r.check(
        "a request while no decode is in rotation gets a clear error",
        during.kind == "error",
        f"{during.kind} {during.status} {during.detail[:200]}",
    )
    took = await wait_role_count(
        serve, http, r, "decode", 1, REJOIN_S, "the restarted decode rejoins rotation by itself"
    )
    r.notes.append(f"rejoined {took:.0f}s after leaving")
    after = await wait_instance(serve, "pd-decode-0")
    r.check(
        "a new vLLM server serves it",
        after.pid != before.pid and after.url != before.url,
        f"{before.url} (pid {before.pid}) -> {after.url} (pid {after.pid})",
    )
    await check_served_with_transfer(serve, http, r, "after the restart")
