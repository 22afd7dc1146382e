"""The proxy's health loop (pd.proxy.instances) against real sockets on loopback.

Three kinds of instance: one that answers /health, one that accepts connections but
never answers (a stopped or CPU-starved process), and a port where nothing listens.
A refused connection takes an instance out of rotation at once; silence only after
``health_misses`` checks in a row, and an answer in between starts the count afresh.
A call waiting on an instance gives up when the instance leaves rotation.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest

from pd.proxy.flow import LeftRotation, chunks_until, unless_left
from pd.proxy.instances import Instance, InstancePool

TIMEOUT_S = 0.2


class HealthServer:
    """A /health endpoint on loopback that answers 200, or accepts and stays silent."""

    def __init__(self) -> None:
        self.silent = False
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                request = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed the connection
            if self.silent:
                self._held.append(writer)  # connected, never answered
                return
            assert request.startswith(b"GET /health ")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again when we return


@dataclass
class Watched:
    """One instance served by ``server``, in a pool that checks it."""

    server: HealthServer
    inst: Instance
    pool: InstancePool
    http: httpx.AsyncClient


@asynccontextmanager
async def watched(misses: int, silent: bool = False) -> AsyncIterator[Watched]:
    server = await HealthServer().start()
    server.silent = silent
    try:
        async with httpx.AsyncClient() as http:
            inst = Instance("pd-decode-0", "decode", server.url)
            pool = InstancePool([inst], http, health_timeout_s=TIMEOUT_S, health_misses=misses)
            yield Watched(server, inst, pool, http)
    finally:
        await server.close()


def test_silent_instance_leaves_after_the_allowed_misses():
    async def go() -> list[bool]:
        async with watched(misses=3) as w:
            await w.pool.check_all()
            seen = [w.inst.healthy]
            w.server.silent = True
            for _ in range(3):
                await w.pool.check_all()
                seen.append(w.inst.healthy)
        return seen

    assert asyncio.run(go()) == [True, True, True, False]


def test_an_answer_between_slow_checks_starts_the_count_afresh():
    async def go() -> list[bool]:
        seen = []
        async with watched(misses=2) as w:
            for silent in (False, True, False, True, True):
                w.server.silent = silent
                await w.pool.check_all()
                seen.append(w.inst.healthy)
        return seen

    assert asyncio.run(go()) == [True, True, True, True, False]


def test_refused_connection_leaves_at_once_and_an_answer_brings_it_back():
    async def go() -> list[bool]:
        async with watched(misses=5) as w:
            await w.pool.check_all()
            seen = [w.inst.healthy]
            w.inst.url = closed_port_url()
            await w.pool.check_all()
            seen.append(w.inst.healthy)
            w.inst.url = w.server.url
            await w.pool.check_all()
            seen.append(w.inst.healthy)
        return seen

    assert asyncio.run(go()) == [True, False, True]


def test_a_silent_instance_never_enters_rotation():
    async def go() -> bool:
        async with watched(misses=3, silent=True) as w:
            await w.pool.check_all()
        return w.inst.healthy

    assert asyncio.run(go()) is False


def test_health_misses_must_be_positive():
    with pytest.raises(ValueError, match="health_misses"):
        InstancePool([], httpx.AsyncClient(), health_misses=0)


def test_suspected_instance_that_answers_stays_in_rotation():
    async def go() -> list[bool]:
        async with watched(misses=2) as w:
            await w.pool.check_all()
            w.pool.suspect(w.inst, "prefill failed: ReadError('')")
            seen = [w.inst.healthy]  # not taken out on the request's word
            await asyncio.sleep(0.1)  # the suspicion's check has answered
            seen.append(w.inst.healthy)
        return seen

    assert asyncio.run(go()) == [True, True]


def test_suspected_instance_that_refuses_leaves_at_once():
    async def go() -> list[bool]:
        async with watched(misses=5) as w:
            await w.pool.check_all()
            seen = [w.inst.healthy]
            w.inst.url = closed_port_url()  # the crashed server's port
            w.pool.suspect(w.inst, "stream broke")
            for _ in range(100):  # the check runs in the background
                await asyncio.sleep(0.01)
                if not w.inst.healthy:
                    break
            seen.append(w.inst.healthy)
        return seen

    assert asyncio.run(go()) == [True, False]


def test_a_suspicion_during_a_check_shares_it():
    async def go() -> int:
        async with watched(misses=3, silent=True) as w:
            w.inst.healthy = True
            round_ = asyncio.ensure_future(w.pool.check_all())
            await asyncio.sleep(0.05)  # the round's check is waiting for an answer
            w.pool.suspect(w.inst, "decode failed")
            await round_
        return w.inst.slow_checks

    assert asyncio.run(go()) == 1  # one slow answer, counted once


def test_a_call_waiting_on_an_instance_gives_up_when_it_leaves_rotation():
    async def go() -> tuple[str, bool]:
        async with watched(misses=1) as w:
            await w.pool.check_all()
            w.server.silent = True  # stopped: the call below waits forever
            call = asyncio.ensure_future(
                unless_left(w.inst, w.http.get(f"{w.inst.url}/health", timeout=30))
            )
            await asyncio.sleep(0.05)
            waiting = not call.done()
            await w.pool.check_all()  # the silent check takes it out of rotation
            try:
                await asyncio.wait_for(call, 1)
            except LeftRotation as e:
                return str(e), waiting
        return "the call ended by itself", waiting

    assert asyncio.run(go()) == ("pd-decode-0", True)


def test_an_instance_back_in_rotation_keeps_new_calls():
    async def go() -> tuple[bool, int]:
        async with watched(misses=5) as w:
            await w.pool.check_all()
            w.inst.url = closed_port_url()
            await w.pool.check_all()  # out
            w.inst.url = w.server.url
            await w.pool.check_all()  # back, with a fresh event
            answer = await unless_left(w.inst, w.http.get(f"{w.inst.url}/health"))
        return w.inst.healthy, answer.status_code

    assert asyncio.run(go()) == (True, 200)


async def _endless() -> AsyncIterator[bytes]:
    """A stream that keeps producing, slowly (one chunk every 20 ms)."""
    while True:
        await asyncio.sleep(0.02)
        yield b"data: {}\n\n"


def test_a_relayed_stream_ends_when_its_instance_leaves_rotation():
    async def go() -> tuple[str, int]:
        inst = Instance("pd-decode-0", "decode", "http://127.0.0.1:9", healthy=True)
        asyncio.get_running_loop().call_later(0.2, inst.left.set)
        seen = 0
        try:
            async for _ in chunks_until(time.monotonic() + 30, _endless(), inst.left):
                seen += 1
        except LeftRotation:
            return "left", seen
        return "ended by itself", seen

    outcome, seen = asyncio.run(go())
    assert outcome == "left" and 0 < seen < 100


def test_a_relayed_stream_that_stalls_ends_when_its_instance_leaves_rotation():
    async def stalled() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        await asyncio.Event().wait()  # never another chunk
        yield b""

    async def go() -> str:
        left = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, left.set)
        try:
            async for _ in chunks_until(time.monotonic() + 30, stalled(), left):
                pass
        except LeftRotation:
            return "left"
        return "ended by itself"

    assert asyncio.run(asyncio.wait_for(go(), 5)) == "left"


def test_a_relayed_stream_past_its_deadline_times_out():
    async def go() -> str:
        try:
            async for _ in chunks_until(time.monotonic() + 0.2, _endless(), asyncio.Event()):
                pass
        except TimeoutError:
            return "deadline"
        return "ended by itself"

    assert asyncio.run(asyncio.wait_for(go(), 5)) == "deadline"
