"""FastAPI app: OpenAI-compatible endpoints in front of prefill and decode instances.

Request flow (vLLM's disaggregation protocol, DESIGN.md):
1. Pick a prefill instance P and a decode instance D (the routing policy).
2. P gets the body with ``max_tokens: 1``, ``stream: false`` and
   ``kv_transfer_params: {"do_remote_decode": true}``; it answers with the
   ``kv_transfer_params`` that locate the prompt's KV.
3. D gets the original body plus those params, loads the KV and generates; its
   answer (streamed or not) goes back to the client unchanged.
A request P rejects (4xx) is answered with P's error. If P fails or is unreachable,
D prefills the prompt itself. A client that disconnects closes the upstream
connections, which makes vLLM abort the request on both instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pd.proxy.errors import ProxyError, error_response
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.metrics import ProxyMetrics
from pd.proxy.routing import RoutingPolicy

logger = logging.getLogger(__name__)

# Fields the prefill leg must not carry: it generates exactly one token, unstreamed.
_PREFILL_DROPPED = ("stream_options", "min_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class ProxySettings:
    served_model_name: str
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0


def create_app(
    pool: InstancePool,
    policy: RoutingPolicy,
    settings: ProxySettings,
    http: httpx.AsyncClient,
) -> FastAPI:
    """``http`` is the pooled client for upstream calls (the pool's health checks share it)."""
    metrics = ProxyMetrics(pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.check_all()
        checker = asyncio.create_task(pool.run())
        try:
            yield
        finally:
            checker.cancel()

    app = FastAPI(title="pd", lifespan=lifespan)
    app.state.pool = pool
    app.state.metrics = metrics

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.get("/health")
    async def health() -> JSONResponse:
        counts = {role: len(pool.healthy(role)) for role in ("prefill", "decode")}
        status = 200 if pool.ready() else 503
        return JSONResponse({"status": "ok" if status == 200 else "unavailable", **counts}, status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(http), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        for inst in pool.healthy("decode"):
            try:
                response = await http.get(f"{inst.url}/v1/models", timeout=5)
                if response.status_code == 200:
                    return JSONResponse(response.json())
            except httpx.HTTPError:
                pool.mark_unhealthy(inst, "/v1/models failed")
        raise ProxyError(503, "no decode instance is available")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, "chat/completions")

    async def _serve(request: Request, endpoint: str) -> Response:
        started = time.monotonic()
        status = 500
        try:
            response = await _route(request, endpoint, started)
            status = response.status_code
            return response
        except ProxyError as e:
            status = e.status
            raise
        finally:
            if status != 200 or not getattr(request.state, "streaming", False):
                metrics.observe_request(endpoint, status, time.monotonic() - started)

    async def _route(request: Request, endpoint: str, started: float) -> Response:
        body = await _read_json(request)
        model = body.get("model")
        if model is not None and model != settings.served_model_name:
            raise ProxyError(
                404, f"The model `{model}` does not exist; this server serves "
                f"`{settings.served_model_name}`", "model",
            )  # fmt: skip
        # Only pd's own prefill leg may tell a decode instance where KV lives.
        body.pop("kv_transfer_params", None)
        prompt_tokens = _estimate_prompt_tokens(body)

        prefill = _pick("prefill", prompt_tokens)
        decode = _pick("decode", prompt_tokens)
        params = await _prefill(request, prefill, endpoint, body, prompt_tokens)
        if isinstance(params, Response):
            return params  # prefill rejected the request: that is the answer
        decode_body = {**body, "kv_transfer_params": params} if params else body
        if body.get("stream"):
            return await _decode_stream(request, decode, endpoint, decode_body, started)
        return await _decode(request, decode, endpoint, decode_body)

    def _pick(role: str, prompt_tokens: int) -> Instance:
        candidates = pool.healthy(role)
        if not candidates:
            raise ProxyError(503, f"no {role} instance is available; retry later")
        return policy.pick(role, candidates, prompt_tokens)

    async def _prefill(
        request: Request, inst: Instance, endpoint: str, body: dict, prompt_tokens: int
    ) -> dict | Response | None:
        leg = {k: v for k, v in body.items() if k not in _PREFILL_DROPPED}
        leg.update(max_tokens=1, stream=False, n=1, kv_transfer_params={"do_remote_decode": True})
        inst.inflight_requests += 1
        inst.outstanding_prompt_tokens += prompt_tokens
        leg_started = time.monotonic()
        try:
            response = await _until_disconnect(
                request, http.post(f"{inst.url}/v1/{endpoint}", json=leg, timeout=_timeout())
            )
        except httpx.HTTPError as e:
            pool.mark_unhealthy(inst, f"prefill failed: {e!r}")
            metrics.fallbacks.inc()
            logger.warning("prefill on %s failed (%r); decode prefills itself", inst.name, e)
            return None
        finally:
            inst.inflight_requests -= 1
            inst.outstanding_prompt_tokens -= prompt_tokens
        metrics.prefill.observe(time.monotonic() - leg_started)
        if 400 <= response.status_code < 500:
            return Response(response.content, response.status_code, media_type="application/json")
        if response.status_code != 200:
            metrics.fallbacks.inc()
            logger.warning("prefill on %s answered %d; decode prefills itself",
                           inst.name, response.status_code)  # fmt: skip
            return None
        return response.json().get("kv_transfer_params")

    async def _decode(request: Request, inst: Instance, endpoint: str, body: dict) -> Response:
        inst.inflight_requests += 1
        try:
            response = await _until_disconnect(
                request, http.post(f"{inst.url}/v1/{endpoint}", json=body, timeout=_timeout())
            )
        except httpx.HTTPError as e:
            pool.mark_unhealthy(inst, f"decode failed: {e!r}")
            raise ProxyError(503, f"decode instance {inst.name} failed: {e!r}") from e
        finally:
            inst.inflight_requests -= 1
        return Response(response.content, response.status_code, media_type="application/json")

    async def _decode_stream(
        request: Request, inst: Instance, endpoint: str, body: dict, started: float
    ) -> Response:
        inst.inflight_requests += 1
        upstream_request = http.build_request(
            "POST", f"{inst.url}/v1/{endpoint}", json=body, timeout=_timeout()
        )
        try:
            upstream = await http.send(upstream_request, stream=True)
        except httpx.HTTPError as e:
            inst.inflight_requests -= 1
            pool.mark_unhealthy(inst, f"decode failed: {e!r}")
            raise ProxyError(503, f"decode instance {inst.name} failed: {e!r}") from e
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            inst.inflight_requests -= 1
            return Response(content, upstream.status_code, media_type="application/json")
        request.state.streaming = True
        return StreamingResponse(
            _relay(upstream, inst, endpoint, started), media_type="text/event-stream"
        )

    async def _relay(
        upstream: httpx.Response, inst: Instance, endpoint: str, started: float
    ) -> AsyncIterator[bytes]:
        status = 200
        last = None
        try:
            async for chunk in upstream.aiter_raw():
                now = time.monotonic()
                if last is None:
                    metrics.observe_ttft(now - started)
                else:
                    metrics.observe_itl(now - last)
                last = now
                yield chunk
        except httpx.HTTPError as e:
            status = 502
            pool.mark_unhealthy(inst, f"stream broke: {e!r}")
            message = {"error": {"message": f"decode instance {inst.name} failed mid-stream",
                                 "type": "server_error", "param": None, "code": 502}}  # fmt: skip
            yield f"data: {json.dumps(message)}\n\n".encode()
        finally:
            # On client disconnect this closes the upstream connection: vLLM aborts.
            await upstream.aclose()
            inst.inflight_requests -= 1
            metrics.observe_request(endpoint, status, time.monotonic() - started)

    def _timeout() -> httpx.Timeout:
        return httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)

    return app


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProxyError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    return body


async def _until_disconnect(request: Request, call) -> httpx.Response:
    """Await an upstream call, cancelling it (vLLM aborts) if the client goes away."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ProxyError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Rough prompt size for load balancing (about 4 characters per token)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content", ""))) // 4 + 1 for m in messages if isinstance(m, dict))
    return 1
