"""One request's way through a prefill and a decode instance.

vLLM's disaggregation protocol (DESIGN.md): the prefill instance gets the body with
``max_tokens: 1``, unstreamed, and ``kv_transfer_params: {"do_remote_decode":
true}``; the decode instance gets the original body plus ``kv_transfer_params`` that
locate the prompt's KV, loads it and generates. Three flows implement it:

``SequentialFlow`` (the default)
    Prefill leg first; its answer's ``kv_transfer_params`` go with the decode leg.
``ConcurrentFlow``
    Both legs at once, tied by a rendezvous tag. Decode parses, schedules and
    allocates while prefill computes, and its connector pulls the KV the moment the
    prefill instance holds it: the second HTTP hop and decode's request handling
    leave the time to first token. It needs the prefill instance's KV address,
    learned from its first answer, so each instance's first request goes
    sequentially.
``FirstTokenFlow`` (``pd.proxy.first_token``)
    Sequential, but the client gets the prefill leg's token at once and decode
    continues from it.

With no prefill instance in rotation, every flow sends the request to decode alone
(``Flow.serve_alone``, counted as a fallback), which prefills it itself; so does a
route on which the policy left prefill out (``Flow.serve_decode_only``: decode holds
most of the prompt already; counted as a routing decision, not a fallback).

All: a request the prefill instance rejects (4xx) is answered with its error; if
the prefill leg fails, or its instance leaves rotation (health checks found it
stopped) while the leg waits, decode prefills the prompt itself; a decode leg whose
instance leaves rotation ends at once with a 503 (an error event mid-stream); a
client that disconnects closes the upstream connections, which makes vLLM abort the
request on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pd.proxy.errors import ProxyError
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.metrics import ProxyMetrics
from pd.proxy.tokenizer import ModelTokenizer
from pd.transfer import timeline
from pd.transfer.params import KVTransferParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Fields the prefill leg must not carry: it generates exactly one token, unstreamed.
_PREFILL_DROPPED = ("stream_options", "min_tokens", "max_completion_tokens")
_DISCONNECT_CHECK_S = 0.5


@dataclass(frozen=True)
class Leg:
    """One request as the proxy routes it."""

    request: Request
    endpoint: str  # "completions" | "chat/completions"
    body: dict[str, Any]
    prompt_tokens: int
    prefill: Instance | None  # None: decode alone (Flow.serve_alone, serve_decode_only)
    decode: Instance
    started: float  # time.monotonic() when the proxy received it
    deadline: float  # time.monotonic() by which the answer must be complete


# The prefill leg's outcome: the KV's params, the instance's 4xx answer, or None (failed).
PrefillOutcome = KVTransferParams | Response | None


class Flow(ABC):
    def __init__(
        self,
        pool: InstancePool,
        metrics: ProxyMetrics,
        http: httpx.AsyncClient,
        timeout: httpx.Timeout,
        chat_output_parsed: bool = False,
        tokenizer: ModelTokenizer | None = None,
    ) -> None:
        """``chat_output_parsed``: the instances parse chat output (a reasoning or tool
        parser), so a chat answer's text cannot be cut at an arbitrary token.
        ``tokenizer``: the instances' tokenizer, for a flow that writes text itself."""
        self._pool = pool
        self._tokenizer = tokenizer
        self._chat_output_parsed = chat_output_parsed
        self._metrics = metrics
        self._http = http
        self._timeout = timeout

    @abstractmethod
    async def serve(self, leg: Leg) -> Response:
        """Answer the request: decode's response, streamed or not, or an error."""

    async def serve_alone(self, leg: Leg) -> Response:
        """No prefill instance is in rotation: decode prefills the prompt itself, so
        the cluster keeps serving (slower) until one is back."""
        self._metrics.fallbacks.inc()
        return await self.serve_decode_only(leg)

    async def serve_decode_only(self, leg: Leg) -> Response:
        """The routing policy left prefill out (decode holds most of the prompt, or
        what it lacks is short): decode computes what it lacks. Not a fallback."""
        self._observe_own_time(time.monotonic() - leg.started)
        return await self._decode_answer(leg, leg.body)

    # --- the prefill leg -----------------------------------------------------------------

    async def _prefill(self, leg: Leg, rendezvous: str = "") -> PrefillOutcome:
        answer = await self._prefill_answer(leg, rendezvous=rendezvous)
        if not isinstance(answer, dict):
            return answer
        assert leg.prefill is not None
        params = self._kv_params(leg.prefill, answer)
        self._learned(leg.prefill, params)
        return params

    def _kv_params(self, inst: Instance, answer: dict[str, Any]) -> KVTransferParams | None:
        """Where a prefill answer says the KV is; None if it says nothing usable."""
        raw = answer.get("kv_transfer_params")
        if not raw:
            return None
        try:
            return KVTransferParams.from_dict(raw)
        except ValueError as e:
            self._metrics.fallbacks.inc()
            logger.warning("prefill on %s answered %s; decode prefills itself", inst.name, e)
            return None

    async def _prefill_answer(
        self, leg: Leg, rendezvous: str = "", **extra: Any
    ) -> dict[str, Any] | Response | None:
        """The prefill instance's whole answer, its 4xx answer, or None (failed).

        ``extra`` fields go into the prefill leg's body.
        """
        body = {k: v for k, v in leg.body.items() if k not in _PREFILL_DROPPED}
        params = KVTransferParams(do_remote_decode=True, pd_rendezvous=rendezvous or None)
        body.update(max_tokens=1, stream=False, n=1, kv_transfer_params=params.to_dict(), **extra)
        inst = leg.prefill
        assert inst is not None, "a leg without prefill goes to serve_alone"
        inst.inflight_requests += 1
        inst.outstanding_prompt_tokens += leg.prompt_tokens
        sent = time.monotonic()
        timeline.mark("proxy_prefill_sent")
        post = self._http.post(f"{inst.url}/v1/{leg.endpoint}", json=body, timeout=self._timeout)
        try:
            response = await unless_left(inst, post)
        except LeftRotation:
            self._metrics.fallbacks.inc()
            logger.warning("prefill on %s abandoned: it left rotation; decode prefills itself",
                           inst.name)  # fmt: skip
            return None
        except httpx.HTTPError as e:
            self._pool.suspect(inst, f"prefill failed: {e!r}")
            self._metrics.fallbacks.inc()
            logger.warning("prefill on %s failed (%r); decode prefills itself", inst.name, e)
            return None
        finally:
            inst.inflight_requests -= 1
            inst.outstanding_prompt_tokens -= leg.prompt_tokens
        self._metrics.prefill.observe(time.monotonic() - sent)
        timeline.mark("proxy_prefill_answer")
        if 400 <= response.status_code < 500:
            return Response(response.content, response.status_code, media_type="application/json")
        if response.status_code != 200:
            self._metrics.fallbacks.inc()
            logger.warning("prefill on %s answered %d; decode prefills itself",
                           inst.name, response.status_code)  # fmt: skip
            return None
        return response.json()

    def _learned(self, inst: Instance, params: KVTransferParams | None) -> None:  # noqa: B027
        """A prefill answer's params; the concurrent flow remembers the KV address."""

    # --- the decode leg ------------------------------------------------------------------

    async def _decode_answer(self, leg: Leg, body: dict[str, Any]) -> Response:
        """Decode's answer to ``body``, streamed if the client asked for a stream."""
        if leg.body.get("stream"):
            return await self._decode_stream(leg, body)
        return await self._decode(leg, body)

    async def _decode(self, leg: Leg, body: dict[str, Any]) -> Response:
        inst = leg.decode
        inst.inflight_requests += 1
        timeline.mark("proxy_decode_sent")
        post = self._http.post(f"{inst.url}/v1/{leg.endpoint}", json=body, timeout=self._timeout)
        try:
            response = await until_disconnect(leg.request, self._on_decode(inst, post))
        finally:
            inst.inflight_requests -= 1
        return Response(response.content, response.status_code, media_type="application/json")

    async def _open_stream(self, leg: Leg, body: dict[str, Any]) -> httpx.Response:
        """Send the decode leg and wait for its headers. The caller relays or closes it."""
        inst = leg.decode
        upstream_request = self._http.build_request(
            "POST", f"{inst.url}/v1/{leg.endpoint}", json=body, timeout=self._timeout
        )
        timeline.mark("proxy_decode_sent")
        return await self._on_decode(inst, self._http.send(upstream_request, stream=True))

    async def _on_decode(self, inst: Instance, call: Awaitable[T]) -> T:
        """A call to decode instance ``inst`` before its answer starts: a 503 if it
        fails (the instance is checked at once) or ``inst`` leaves rotation meanwhile."""
        try:
            return await unless_left(inst, call)
        except LeftRotation:
            raise ProxyError(503, _left_message(inst)) from None
        except httpx.HTTPError as e:
            self._pool.suspect(inst, f"decode failed: {e!r}")
            raise ProxyError(503, f"decode instance {inst.name} failed: {e!r}") from e

    async def _decode_stream(self, leg: Leg, body: dict[str, Any]) -> Response:
        upstream = await self._open_stream(leg, body)
        if upstream.status_code != 200:
            return await _error_answer(upstream)
        return self._stream_response(leg, upstream_chunks(upstream))

    def _stream_response(self, leg: Leg, chunks: AsyncGenerator[bytes, None]) -> Response:
        """Relay a decode stream to the client; closing ``chunks`` closes the upstream."""
        leg.decode.inflight_requests += 1
        leg.request.state.streaming = True
        return StreamingResponse(self._relay(leg, chunks), media_type="text/event-stream")

    async def _relay(self, leg: Leg, chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
        status = 200
        last = None
        relayed = chunks_until(leg.deadline, chunks, leg.decode.left)
        try:
            async with contextlib.aclosing(relayed):  # its watcher ends with the relay
                async for chunk in relayed:
                    now = time.monotonic()
                    if last is None:
                        timeline.mark("proxy_first_chunk")
                        self._metrics.observe_ttft(now - leg.started)
                    else:
                        self._metrics.observe_itl(now - last)
                    last = now
                    yield chunk
        except httpx.HTTPError as e:
            status = 502
            self._pool.suspect(leg.decode, f"stream broke: {e!r}")
            yield error_event(502, f"decode instance {leg.decode.name} failed mid-stream")
        except LeftRotation:
            status = 503
            yield error_event(503, _left_message(leg.decode))
        except ProxyError as e:
            status = e.status
            yield error_event(e.status, e.message)
        except TimeoutError:
            status = 504
            yield error_event(504, "the request took longer than its deadline")
        finally:
            # On client disconnect this closes the upstream connection: vLLM aborts.
            await chunks.aclose()
            leg.decode.inflight_requests -= 1
            self._metrics.observe_request(leg.endpoint, status, time.monotonic() - leg.started)

    def _observe_own_time(self, seconds: float) -> None:
        self._metrics.proxy_overhead.observe(seconds)


class SequentialFlow(Flow):
    """Prefill, then decode with the prefill answer's ``kv_transfer_params``."""

    async def serve(self, leg: Leg) -> Response:
        before_prefill = time.monotonic()
        outcome = await until_disconnect(leg.request, self._prefill(leg))
        after_prefill = time.monotonic()
        if isinstance(outcome, Response):
            return outcome  # prefill rejected the request: that is the answer
        body = {**leg.body, "kv_transfer_params": outcome.to_dict()} if outcome else leg.body
        self._observe_own_time(before_prefill - leg.started + time.monotonic() - after_prefill)
        return await self._decode_answer(leg, body)


class ConcurrentFlow(SequentialFlow):
    """Prefill and decode at once, tied by a rendezvous tag (sequential until the
    prefill instance's KV address is known)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kv_addresses: dict[str, tuple[str | None, KVTransferParams]] = {}
        self._background: set[asyncio.Task] = set()

    def _learned(self, inst: Instance, params: KVTransferParams | None) -> None:
        if params is not None and params.answers_rendezvous():
            self._kv_addresses[inst.name] = (inst.url, params.kv_address())

    def _kv_address(self, inst: Instance) -> KVTransferParams | None:
        known = self._kv_addresses.get(inst.name)
        # A restarted instance serves on a new URL, with a new engine: learn it again.
        return known[1] if known is not None and known[0] == inst.url else None

    async def serve(self, leg: Leg) -> Response:
        assert leg.prefill is not None, "a leg without prefill goes to serve_alone"
        address = self._kv_address(leg.prefill)
        if address is None:
            return await super().serve(leg)
        tag = uuid.uuid4().hex
        params = address.replace(do_remote_prefill=True, pd_rendezvous=tag)
        body = {**leg.body, "kv_transfer_params": params.to_dict()}
        prefill = asyncio.ensure_future(self._prefill(leg, rendezvous=tag))
        self._observe_own_time(time.monotonic() - leg.started)
        try:
            if leg.body.get("stream"):
                response = await self._serve_stream(leg, body, prefill)
            else:
                response = await self._serve_whole(leg, body, prefill)
        except BaseException:
            prefill.cancel()  # the client went away or decode failed: prefill aborts too
            raise
        if not prefill.done():
            if response.status_code != 200:
                prefill.cancel()  # decode rejected the request: nobody will read the KV
            else:
                # Decode got its KV (or recomputed it); the prefill answer still comes
                # back for the books, in the background.
                self._background.add(prefill)
                prefill.add_done_callback(self._forget)
        return response

    def _forget(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background prefill leg failed: %r", task.exception())

    async def _serve_whole(
        self, leg: Leg, body: dict[str, Any], prefill: asyncio.Future
    ) -> Response:
        decode = asyncio.ensure_future(self._decode(leg, body))
        try:
            await _first_of(leg.request, prefill, decode)
            if not decode.done():
                fallback = self._prefill_failed(prefill)
                if fallback is not None:
                    decode.cancel()  # vLLM aborts the leg waiting for KV that never comes
                    return (
                        fallback
                        if isinstance(fallback, Response)
                        else await self._decode(leg, leg.body)
                    )
            return await until_disconnect(leg.request, decode)
        finally:
            if not decode.done():
                decode.cancel()

    async def _serve_stream(
        self, leg: Leg, body: dict[str, Any], prefill: asyncio.Future
    ) -> Response:
        upstream = await self._open_stream(leg, body)
        if upstream.status_code != 200:
            return await _error_answer(upstream)
        chunks = upstream.aiter_raw()
        first = asyncio.ensure_future(anext(chunks, b""))
        committed = False
        try:
            await _first_of(leg.request, prefill, first)
            if not first.done():
                fallback = self._prefill_failed(prefill)
                if fallback is not None:
                    # Nothing was sent to the client yet: start over without the KV.
                    if isinstance(fallback, Response):
                        return fallback
                    return await self._decode_stream(leg, leg.body)
            chunk = await until_disconnect(leg.request, self._on_decode(leg.decode, first))
            committed = True
            return self._stream_response(leg, upstream_chunks(upstream, chunk, chunks))
        finally:
            if not committed:
                first.cancel()
                await upstream.aclose()

    @staticmethod
    def _prefill_failed(prefill: asyncio.Future) -> Response | bool | None:
        """After the prefill leg ended: its 4xx answer, True if it failed, None if fine."""
        outcome = prefill.result()
        if isinstance(outcome, Response):
            return outcome
        return True if outcome is None else None


async def chunks_until(
    deadline: float, chunks: AsyncIterator[bytes], left: asyncio.Event
) -> AsyncGenerator[bytes, None]:
    """``chunks`` until they end; TimeoutError once ``deadline`` passes, LeftRotation
    once ``left`` is set (the instance producing them stopped answering)."""
    waiting: list[asyncio.Timeout] = []  # the wait for the next chunk, if one is on

    async def cut_short() -> None:
        await left.wait()
        for timeout in waiting:
            timeout.reschedule(asyncio.get_running_loop().time())

    # One watcher per stream, not a task per chunk: it ends the wait in progress.
    watcher = asyncio.ensure_future(cut_short())
    try:
        while not left.is_set():
            try:
                async with asyncio.timeout(deadline - time.monotonic()) as timeout:
                    waiting.append(timeout)
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if left.is_set():
                    break
                raise
            finally:
                waiting.clear()
            yield chunk
        raise LeftRotation("the instance left rotation")
    finally:
        watcher.cancel()


def _left_message(inst: Instance) -> str:
    return f"decode instance {inst.name} stopped answering (out of rotation); retry"


class LeftRotation(Exception):
    """The instance a call waited on left rotation before the call ended."""


async def unless_left(inst: Instance, call: Awaitable[T]) -> T:
    """``call``'s result, or LeftRotation once ``inst`` leaves rotation (the call is
    cancelled, which closes its connection: vLLM aborts the request when it can)."""
    task = asyncio.ensure_future(call)
    left = asyncio.ensure_future(inst.left.wait())
    try:
        done, _ = await asyncio.wait((task, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise LeftRotation(inst.name)
    return task.result()


async def _error_answer(upstream: httpx.Response) -> Response:
    """A decode instance's non-200 answer to a streamed request, relayed whole."""
    content = await upstream.aread()
    await upstream.aclose()
    return Response(content, upstream.status_code, media_type="application/json")


async def upstream_chunks(
    upstream: httpx.Response, first: bytes = b"", rest: AsyncIterator[bytes] | None = None
) -> AsyncGenerator[bytes, None]:
    """An open upstream stream's bytes (``first``, then ``rest``, or all of it); closed
    (vLLM aborts the request if unfinished) when the generator is."""
    try:
        if first:
            yield first
        async for chunk in rest if rest is not None else upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def error_event(status: int, message: str) -> bytes:
    """A server-sent event carrying an error in OpenAI's format (mid-stream failures)."""
    kind = "timeout" if status == 504 else "server_error"
    if 400 <= status < 500:
        kind = "invalid_request_error"
    error = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return f"data: {json.dumps(error)}\n\n".encode()


async def _first_of(request: Request, *futures: asyncio.Future) -> None:
    """Wait until one of ``futures`` is done, or raise 499 when the client went away."""
    while True:
        done, _ = await asyncio.wait(
            futures, timeout=_DISCONNECT_CHECK_S, return_when=asyncio.FIRST_COMPLETED
        )
        if done:
            return
        if await request.is_disconnected():
            raise ProxyError(499, "client disconnected")


async def until_disconnect(request: Request, call: Awaitable[Any]) -> Any:
    """Await an upstream call, cancelling it (vLLM aborts) if the client goes away."""
    task = asyncio.ensure_future(call)
    try:
        await _first_of(request, task)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
