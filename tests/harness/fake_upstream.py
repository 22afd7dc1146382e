"""Fake vLLM instances for engine-free tests of the proxy (tests/test_proxy_flows.py).

``FakeCluster`` answers the proxy's upstream calls through ``httpx.MockTransport``:
each ``FakeInstance`` has a base URL of its own (``http://<name>.fake``), answers
``/health`` as told, and answers ``POST /v1/...`` with what the test scripts
(``FakeInstance.answer``). Every call is recorded with its body and how it ended:
answered, or aborted by the proxy (the call was cancelled, or a stream closed before
its end, which is what makes vLLM abort a request). ``proxy_on_loopback`` serves an
app with uvicorn on a real loopback socket, so that streaming and a client that
disconnects behave as they do in production.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

WAIT_S = 10.0  # bound on every wait for the proxy to do something: a broken one fails


@dataclass
class Call:
    """One request the proxy sent to a fake instance."""

    path: str
    body: dict[str, Any]
    state: str = "open"  # "open" | "answered" | "failed" | "aborted"
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def end(self, state: str) -> None:
        if self.state == "open":
            self.state = state
            self.ended.set()

    async def wait_ended(self) -> str:
        await asyncio.wait_for(self.ended.wait(), WAIT_S)
        return self.state


Answer = Callable[[Call], Awaitable[httpx.Response]]


class FakeInstance:
    def __init__(self, name: str, role: str, answer: Answer) -> None:
        self.name = name
        self.role = role
        self.url = f"http://{name}.fake"
        self.answer = answer
        self.health_status = 200
        self.refuse = False  # connections refused (a crashed instance), /health included
        self.calls: list[Call] = []
        self.health_checks = 0
        self._arrived = asyncio.Condition()

    async def wait_calls(self, count: int) -> list[Call]:
        """The first ``count`` calls, once they have arrived."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.calls) >= count), WAIT_S)
        return self.calls[:count]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.refuse:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            self.health_checks += 1
            return httpx.Response(self.health_status)
        if path == "/metrics":
            return httpx.Response(200, text="")
        if request.method == "GET" and path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "pd-tiny"}]})
        call = Call(path, json.loads(request.content))
        async with self._arrived:
            self.calls.append(call)
            self._arrived.notify_all()
        try:
            response = await self.answer(call)
        except asyncio.CancelledError:
            call.end("aborted")
            raise
        except BaseException:
            call.end("failed")  # a scripted failure (a connection error), not an abort
            raise
        if not isinstance(response.stream, _RecordedStream):
            call.end("answered")
        return response


class FakeCluster:
    """Fake instances behind one ``httpx.MockTransport``, told apart by host."""

    def __init__(self, *instances: FakeInstance) -> None:
        self.instances = {inst.name: inst for inst in instances}
        self._by_host = {httpx.URL(inst.url).host: inst for inst in instances}
        self.transport = httpx.MockTransport(self._handle)

    def __getitem__(self, name: str) -> FakeInstance:
        return self.instances[name]

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        return await self._by_host[request.url.host].handle(request)


# --- scripted answers ------------------------------------------------------------


def whole(body: dict[str, Any], status: int = 200, gate: asyncio.Event | None = None) -> Answer:
    """A JSON answer; after ``gate`` is set, if given."""

    async def answer(call: Call) -> httpx.Response:
        if gate is not None:
            await gate.wait()
        return httpx.Response(status, json=body)

    return answer


def never() -> Answer:
    """No answer at all (a stopped instance): the call waits until the proxy gives up."""

    async def answer(call: Call) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return answer


def refused() -> Answer:
    """The connection fails (the instance crashed between health checks)."""

    async def answer(call: Call) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    return answer


def stream(
    events: list[bytes], then: str = "end", hold: asyncio.Event | None = None, hold_from: int = 1
) -> Answer:
    """A 200 event stream of ``events``. ``then``: "end" (the stream ends), "hang" (no
    more data, ever), "break" (the connection drops: httpx.ReadError). With ``hold``,
    the events from index ``hold_from`` on wait until it is set."""

    async def chunks() -> AsyncIterator[bytes]:
        for index, event in enumerate(events):
            if index == hold_from and hold is not None:
                await hold.wait()
            yield event
        if then == "hang":
            await asyncio.Event().wait()
        if then == "break":
            raise httpx.ReadError("connection reset by peer")

    async def answer(call: Call) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"},
            stream=_RecordedStream(call, chunks()),
        )  # fmt: skip

    return answer


def in_turn(*answers: Answer) -> Answer:
    """The first call gets the first answer, the second the second, and so on."""
    pending = list(answers)

    async def answer(call: Call) -> httpx.Response:
        if not pending:
            raise AssertionError(f"unscripted call to {call.path}: {call.body}")
        return await pending.pop(0)(call)

    return answer


class _RecordedStream(httpx.AsyncByteStream):
    """A response body that records whether the proxy read it to its end or closed it
    before (vLLM aborts the request then)."""

    def __init__(self, call: Call, chunks: AsyncIterator[bytes]) -> None:
        self._call = call
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk
        self._call.end("answered")

    async def aclose(self) -> None:
        self._call.end("aborted")  # no-op when the stream was read to its end


# --- vLLM-shaped bodies ----------------------------------------------------------


def completion(
    text: str,
    *,
    id: str = "cmpl-1",
    finish: str = "length",
    kv_transfer_params: dict[str, Any] | None = None,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    body: dict[str, Any] = {"id": id, "object": "text_completion", "created": 7,
                            "model": "pd-tiny", "choices": [choice]}  # fmt: skip
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    return body


def sse(*chunks: dict[str, Any], done: bool = True) -> list[bytes]:
    """Server-sent events as vLLM writes them, ``data: [DONE]`` last."""
    events = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks]
    return [*events, b"data: [DONE]\n\n"] if done else events


def completion_chunks(*texts: str, id: str = "cmpl-d") -> list[dict[str, Any]]:
    """Streamed completion chunks, one per text; the last one ends the choice."""
    return [
        {"id": id, "object": "text_completion", "created": 7, "model": "pd-tiny",
         "choices": [{"index": 0, "text": text, "logprobs": None,
                      "finish_reason": "length" if i == len(texts) - 1 else None}]}
        for i, text in enumerate(texts)
    ]  # fmt: skip


def read_events(data: bytes) -> list[Any]:
    """The payloads of an event stream: parsed JSON, or the string ``[DONE]``."""
    out: list[Any] = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[len(b"data: ") :]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


# --- the app on loopback ---------------------------------------------------------


@asynccontextmanager
async def proxy_on_loopback(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port (no lifespan: the test drives
    health checks itself); its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if serving.done() or time.monotonic() > deadline:
            serving.result()  # its error, if it failed
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, WAIT_S)
