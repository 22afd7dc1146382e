"""Instances that stop answering (SIGSTOP, then SIGCONT) or run too slowly: health checks
take them out of rotation and bring them back; requests end before their deadline."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import httpx

from pd.serve_process import PdServeProcess

from ..bounds import ENGINE_SLACK_S, PROXY_SLACK_S
from ..client import completion_body, send
from ..probes import (
    check_not_blamed,
    check_served_with_transfer,
    health,
    healthy_gauge,
    prefill_busy,
    wait_role_count,
    wait_until,
)
from ..results import ScenarioResult
from ..throttle import Throttle
from .config import FAULT_MAX_MODEL_LEN

# Each scenario: the fault, the requests around it, what must hold. Deadlines are upper
# bounds ("never hangs"), not speed expectations.


async def prefill_stops_answering(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """Prefill's vLLM stops answering (SIGSTOP) with requests in flight, for longer
    than the request deadline; then it recovers (SIGCONT). The requests in their
    prefill leg give it up when health checks take prefill out of rotation, and decode
    prefills them itself: they complete, long before the deadline. While no prefill is
    in rotation the proxy serves on decode alone."""
    prefill = serve.instances()["pd-prefill-0"]
    since = serve.log_size()
    deadline_s = serve.request_s + ENGINE_SLACK_S
    bodies = [completion_body(1800, 16, stream=i % 2 == 0) for i in range(8)]
    tasks = [asyncio.create_task(send(http, serve.url, b, deadline_s)) for b in bodies]
    busy, _, _ = await wait_until("prefill busy", partial(prefill_busy, serve, http), 10, 0.02)
    prefill.stop()  # at the first prefill leg: most prompts are still to be computed
    r.check("requests were in their prefill leg at the stop", busy)
    try:
        took = await wait_role_count(
            serve,
            http,
            r,
            "prefill",
            0,
            15,
            "health checks take the stopped prefill out of rotation",
        )
        r.notes.append(f"out of rotation {took:.1f}s after SIGSTOP")
        r.check(
            "its pd_instance_healthy gauge is 0",
            await healthy_gauge(serve, http, "pd-prefill-0") == 0,
        )
        reported = await health(serve, http)
        r.check(
            "the proxy reports itself degraded, still serving (200)",
            reported["http_status"] == 200 and reported["status"] == "degraded",
            repr(reported),
        )
        during = await send(http, serve.url, completion_body(200, 8), 30)
        r.outcomes.append(during)
        r.check(
            "a request while no prefill is in rotation completes (decode prefills it)",
            during.kind == "completed",
            f"{during.kind} {during.status} {during.detail[:200]}",
        )
        # Hold the stop past the request deadline: in-flight legs must give up by then.
        await asyncio.sleep(max(0.0, serve.request_s + 2 - took))
    finally:
        prefill.resume()
    outcomes = await asyncio.gather(*tasks)
    r.outcomes += outcomes
    r.check(
        f"in-flight requests complete or fail clearly within request_s + {ENGINE_SLACK_S} s",
        all(o.kind in ("completed", "error") for o in outcomes),
        ", ".join(f"{o.kind}/{o.status}/{o.elapsed_s:.1f}s" for o in outcomes),
    )
    r.check(
        "in-flight requests fall back to decode when prefill leaves rotation "
        "(each completes before the request deadline)",
        all(o.kind == "completed" and o.elapsed_s < serve.request_s for o in outcomes),
        f"latest ended {max(o.elapsed_s for o in outcomes):.1f}s after it was sent",
    )
    check_not_blamed(serve, r, "pd-decode-0", since)
    took = await wait_role_count(
        serve, http, r, "prefill", 1, 15, "prefill back in rotation after SIGCONT"
    )
    r.notes.append(f"back in rotation {took:.1f}s after SIGCONT")
    await check_served_with_transfer(serve, http, r, "after recovery")


async def decode_stops_answering(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """Decode's vLLM stops answering (SIGSTOP): idle, health checks alone take it out of
    rotation and bring it back after SIGCONT; mid-request, a waiting request gets a 503
    and a stream an error event once health checks take decode out of rotation, well
    before the per-request deadline (timeouts.request_s)."""
    decode = serve.instances()["pd-decode-0"]
    since = serve.log_size()
    # Idle first: only the health checks can notice.
    decode.stop()
    try:
        took = await wait_role_count(
            serve,
            http,
            r,
            "decode",
            0,
            15,
            "health checks take an idle stopped decode out of rotation",
        )
        r.notes.append(f"idle: out of rotation {took:.1f}s after SIGSTOP")
    finally:
        decode.resume()
    took = await wait_role_count(
        serve, http, r, "decode", 1, 15, "decode back in rotation after SIGCONT"
    )
    r.notes.append(f"idle: back in rotation {took:.1f}s after SIGCONT")
    # Now with requests in flight: decode is throttled before the stream is sent, so it
    # is still running however late this client gets to stop it.
    bound = serve.request_s + PROXY_SLACK_S
    first_event = asyncio.Event()
    throttle = Throttle(decode)
    throttle.start()
    stream = asyncio.create_task(
        send(http, serve.url, completion_body(200, 1500, stream=True), bound, first_event.set)
    )
    try:
        await asyncio.wait_for(first_event.wait(), 60)
    finally:
        r.notes.append(await throttle.end(leave_stopped=first_event.is_set()))
    r.require("the stream starts", first_event.is_set())
    started = time.monotonic()
    try:
        waiting = await send(http, serve.url, completion_body(200, 16), bound)
        r.outcomes.append(waiting)
        outcome = await stream
        r.outcomes.append(outcome)
        stalled_s = time.monotonic() - started
        r.check(
            "the waiting request gets a 503 when decode leaves rotation, before request_s",
            waiting.kind == "error"
            and waiting.status == 503
            and waiting.elapsed_s < serve.request_s,
            f"{waiting.kind} {waiting.status} {waiting.elapsed_s:.1f}s {waiting.detail}",
        )
        r.check(
            "the stream ends with an error event when decode leaves rotation, before request_s",
            outcome.kind == "error" and outcome.status == 200 and stalled_s < serve.request_s,
            f"{outcome.kind} {outcome.status} after {stalled_s:.1f}s stalled: {outcome.detail}",
        )
        await wait_role_count(
            serve, http, r, "decode", 0, 15, "health checks take the stopped decode out of rotation"
        )
    finally:
        decode.resume()
    check_not_blamed(serve, r, "pd-prefill-0", since)
    await wait_role_count(
        serve,
        http,
        r,
        "decode",
        1,
        15,
        "decode back in rotation after SIGCONT (requests were in flight)",
    )
    await check_served_with_transfer(serve, http, r, "after recovery")


async def request_deadline(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """A stream that keeps producing tokens but runs past timeouts.request_s is ended
    by the proxy with an error event at the deadline. Decode is throttled (see
    Throttle) so the stream is slow but never silent for long."""
    throttle = Throttle(serve.instances()["pd-decode-0"])
    bound = serve.request_s + PROXY_SLACK_S
    body = completion_body(100, FAULT_MAX_MODEL_LEN - 200, stream=True)
    throttle.start()
    try:
        outcome = await send(http, serve.url, body, bound)
    finally:
        r.notes.append(await throttle.end())
    r.outcomes.append(outcome)
    r.check(
        "the stream was producing tokens (throttled) when the deadline came",
        outcome.events >= 2,
        f"{outcome.events} events",
    )
    r.check(
        f"the stream ends with an error event by request_s + {PROXY_SLACK_S} s ({bound:.0f}s)",
        outcome.kind == "error",
        f"{outcome.kind} {outcome.status} {outcome.elapsed_s:.1f}s after "
        f"{outcome.events} events: {outcome.detail}",
    )
