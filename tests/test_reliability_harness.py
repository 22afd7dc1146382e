"""The fault tests' client (scripts/scenarios/client.py) tells every way a request can end apart:
completed, a clear error, lost (dropped, malformed, truncated) or hung. No engines; the
throttle the fault scenarios use, on a sleeping process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pd.serve_process import VllmInstance
from scripts.scenarios.client import Outcome, completion_body, send
from scripts.scenarios.throttle import Throttle
from tests.harness.waiting import wait_for

STREAM = completion_body(max_tokens=2, stream=True)
PLAIN = completion_body(max_tokens=2)


def events(*payloads: object) -> bytes:
    return b"".join(
        f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads
    )


CHUNK = {"choices": [{"index": 0, "text": "a"}]}
USAGE = {"choices": [], "usage": {"completion_tokens": 2}}
SHORT_USAGE = {"choices": [], "usage": {"completion_tokens": 1}}
WHOLE = json.dumps({"choices": [{}], "usage": {"completion_tokens": 2}}).encode()
SHORT = json.dumps({"choices": [{}], "usage": {"completion_tokens": 1}}).encode()
ERROR = {"error": {"message": "decode failed", "type": "server_error", "code": 502}}


def outcome(body: dict, status: int, content: bytes, *, delay_s: float = 0) -> Outcome:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        return httpx.Response(status, content=content)

    async def go() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await send(http, "http://pd", body, deadline_s=0.5)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("body", "status", "content", "kind"),
    [
        (STREAM, 200, events(CHUNK, CHUNK, USAGE, "[DONE]"), "completed"),
        (STREAM, 200, events(CHUNK, ERROR), "error"),
        (STREAM, 200, events(CHUNK, ERROR, "[DONE]"), "error"),
        (STREAM, 200, events(CHUNK, CHUNK, USAGE), "lost"),  # no [DONE]: truncated
        (STREAM, 200, events(CHUNK, USAGE, "[DONE]")[:-1], "lost"),  # cut inside an event
        (STREAM, 200, b'data: {"choices": [{"te' + events(ERROR), "lost"),  # error mid-event
        (STREAM, 200, events(ERROR, CHUNK, USAGE, "[DONE]"), "lost"),  # error, then more
        (STREAM, 200, events(CHUNK, SHORT_USAGE, "[DONE]"), "lost"),  # fewer tokens
        (STREAM, 200, events(CHUNK, "not json", USAGE, "[DONE]"), "lost"),
        (STREAM, 200, b"", "lost"),
        (PLAIN, 200, WHOLE, "completed"),
        (PLAIN, 200, SHORT, "lost"),  # fewer tokens than asked for
        (PLAIN, 200, b'{"choices": [', "lost"),
        (PLAIN, 503, json.dumps(ERROR).encode(), "error"),
        (STREAM, 504, json.dumps(ERROR).encode(), "error"),
        (PLAIN, 502, b"Bad Gateway", "lost"),  # an error, but not a clear one
    ],
)
def test_outcomes(body, status, content, kind):
    assert outcome(body, status, content).kind == kind


def test_no_end_within_the_deadline_is_hung():
    result = outcome(PLAIN, 200, b"{}", delay_s=5)
    assert result.kind == "hung"
    assert result.elapsed_s < 2


def test_connection_dropped_without_an_answer_is_lost():
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    async def go() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await send(http, "http://pd", PLAIN, deadline_s=5)

    assert asyncio.run(go()).kind == "lost"


def process_state(pid: int) -> str:
    """Stopped (T in /proc) or running (running or sleeping: R, S, D)."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return "stopped" if state == "T" else "running"


def settles(pid: int, state: str) -> bool:
    """The process reaches ``state`` within seconds: a signal takes effect only when its
    target next runs, which on a loaded machine is not at once after kill()."""
    return wait_for(lambda: process_state(pid) == state, timeout_s=5, interval_s=0.01)


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield VllmInstance("sleeper", "decode", process.pid, "http://unused")
    process.kill()
    process.wait()


def test_throttle_runs_and_stops_the_group_in_turns(sleeper):
    throttle = Throttle(sleeper)
    throttle.start()
    seen = set()
    until = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < until:
        seen.add(process_state(sleeper.pid))
        time.sleep(0.005)
    note = asyncio.run(throttle.end())
    assert seen == {"running", "stopped"}, seen
    assert settles(sleeper.pid, "running"), "end() leaves the group running"
    assert "cycles" in note and "?" not in note, note


def test_throttle_can_leave_the_group_stopped_and_never_restarts(sleeper):
    throttle = Throttle(sleeper)
    throttle.start()  # ended at once: before the throttle has set up its handlers, too
    asyncio.run(throttle.end(leave_stopped=True))
    assert settles(sleeper.pid, "stopped")
    throttle.start()  # a start() after end() starts nothing
    assert not throttle.running
    time.sleep(1)
    assert process_state(sleeper.pid) == "stopped"
