"""FastAPI app: OpenAI-compatible endpoints in front of prefill and decode instances.

Each request is checked (``pd.proxy.validation``), gets a prefill instance and a
decode instance from the routing policy, and goes through them by the configured
flow (``pd.proxy.flow``: prefill first, both legs at once, or prefill's first token
streamed at once: ``pd.proxy.first_token``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pd.proxy.auth import ApiKeyMiddleware
from pd.proxy.errors import ProxyError, error_response
from pd.proxy.flow import Flow, Leg
from pd.proxy.instances import InstancePool
from pd.proxy.kv_index import KVIndex
from pd.proxy.metrics import ProxyMetrics
from pd.proxy.routing import DECODE_ONLY, RoutingPolicy, RoutingRequest
from pd.proxy.tokenizer import ModelTokenizer
from pd.proxy.validation import MIB, RequestLimits, read_body
from pd.registry import FLOWS

logger = logging.getLogger(__name__)

# How long the proxy waits for its tokenizer before it serves (a local one takes ~50 ms
# once transformers is imported; a hub id may still be downloading).
TOKENIZER_WAIT_S = 30.0


@dataclass(frozen=True)
class ProxySettings:
    served_model_name: str
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    flow: str = "first-token"  # a name in pd.registry.FLOWS
    chat_output_parsed: bool = False  # the instances run a reasoning or tool-call parser
    max_body_bytes: int = 32 * MIB
    max_n: int = 16
    max_model_len: int | None = None  # None: vLLM alone checks max_tokens against it
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    tokenizer: str | None = None  # the model's folder or hub id, for routing by token ids


def _report_end(task: asyncio.Task) -> None:
    """The policy's background work should run until shutdown; say so if it ended."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("routing policy's background task failed: %r; routing goes on "
                     "without it", task.exception())  # fmt: skip


def create_app(
    pool: InstancePool,
    policy: RoutingPolicy,
    settings: ProxySettings,
    http: httpx.AsyncClient,
) -> FastAPI:
    """``http`` is the pooled client for upstream calls (the pool's health checks share it)."""
    metrics = ProxyMetrics(pool)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)
    flow_class: type[Flow] = FLOWS.load(settings.flow)
    tokenizer = ModelTokenizer(settings.tokenizer) if settings.tokenizer else None
    flow = flow_class(
        pool, metrics, http, timeout,
        chat_output_parsed=settings.chat_output_parsed, tokenizer=tokenizer,
    )  # fmt: skip
    limits = RequestLimits(
        settings.served_model_name,
        max_body_bytes=settings.max_body_bytes,
        max_n=settings.max_n,
        max_model_len=settings.max_model_len,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loaded before serving, so its seconds of CPU never land on requests; one that
        # takes longer loads on in the background (a tokenizer that does not load is
        # reported, and the flows and policies do without it).
        loading = asyncio.create_task(tokenizer.load()) if tokenizer else None
        if loading is not None:
            done, _ = await asyncio.wait({loading}, timeout=TOKENIZER_WAIT_S)
            if not done:
                logger.warning("proxy: the tokenizer is still loading after %.0f s; serving "
                               "meanwhile", TOKENIZER_WAIT_S)  # fmt: skip
        await pool.check_all()
        checker = asyncio.create_task(pool.run())
        background = asyncio.create_task(policy.run(pool))  # e.g. KV events in
        background.add_done_callback(_report_end)
        try:
            yield
        finally:
            checker.cancel()
            background.cancel()
            if loading is not None:
                loading.cancel()

    app = FastAPI(title="pd", lifespan=lifespan)
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.tokenizer = tokenizer
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    # Every other error in OpenAI's format too: unknown paths, wrong methods, ...
    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {
            404: f"Invalid URL ({request.method} {request.url.path})",
            405: f"Method {request.method} is not allowed for {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        param = ".".join(str(part) for part in problem["loc"])
        return error_response(400, f"Invalid parameter '{param}': {problem['msg']}", param)

    @app.get("/health")
    async def health() -> JSONResponse:
        counts = {role: len(pool.healthy(role)) for role in ("prefill", "decode")}
        # "degraded": no prefill instance, decode prefills requests itself; still serving.
        if counts["prefill"] and counts["decode"]:
            state, status = "ok", 200
        else:
            state, status = ("degraded", 200) if counts["decode"] else ("unavailable", 503)
        return JSONResponse({"status": state, **counts}, status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        kv_index = getattr(policy, "index", None)
        feeds = getattr(policy, "feeds", None)
        rendered = await metrics.render(
            http,
            kv_index if isinstance(kv_index, KVIndex) else None,
            {name: f.stats for name, f in feeds.feeds.items()} if feeds is not None else None,
        )
        return Response(rendered, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        for inst in pool.healthy("decode"):
            try:
                response = await http.get(f"{inst.url}/v1/models", timeout=5)
                if response.status_code == 200:
                    return JSONResponse(response.json())
            except httpx.HTTPError:
                pool.suspect(inst, "/v1/models failed")
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
        body = await read_body(request, endpoint, limits)
        # Only pd's own prefill leg may tell a decode instance where KV lives.
        body.pop("kv_transfer_params", None)
        decodes = pool.healthy("decode")
        if not decodes:
            raise ProxyError(503, "no decode instance is available; retry later")
        routed = RoutingRequest(endpoint, body, tokenizer)
        # No prefill in rotation: decode serves alone (Flow.serve_alone).
        routing_started, routing_cpu_started = time.monotonic(), time.thread_time()
        route = await policy.route(routed, pool.healthy("prefill"), decodes)
        metrics.routing.observe(time.monotonic() - routing_started)
        # Other requests' callbacks would count too if the route waited on a thread;
        # a policy that routes without awaiting anything (every prompt short enough to
        # tokenize on the loop) gets exactly its own CPU time.
        metrics.routing_cpu.observe(time.thread_time() - routing_cpu_started)
        if routed.tokenize_s is not None:
            metrics.routing_tokenize.observe(routed.tokenize_s)
        metrics.routing_decisions.labels(route.kind).inc()

        leg = Leg(
            request=request,
            endpoint=endpoint,
            body=body,
            prompt_tokens=routed.prompt_tokens,
            prefill=route.prefill,
            decode=route.decode,
            started=started,
            deadline=started + settings.request_timeout_s,
        )
        try:
            # Until the answer starts; a stream's relay keeps the same deadline.
            async with asyncio.timeout(leg.deadline - time.monotonic()):
                if leg.prefill is not None:
                    serve = flow.serve
                elif route.kind == DECODE_ONLY:
                    serve = flow.serve_decode_only
                else:
                    serve = flow.serve_alone
                return await serve(leg)
        except TimeoutError:
            raise ProxyError(
                504, f"the request took longer than {settings.request_timeout_s:g} s"
            ) from None

    return app
