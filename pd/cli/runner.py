"""Run a planned cluster until Ctrl-C / SIGTERM: start, serve, drain, stop."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
from typing import Any

import httpx
import uvicorn

from pd.cluster import kv_events
from pd.cluster.launcher import Cluster, StartupError
from pd.cluster.plan import ClusterPlan
from pd.log import setup_logging
from pd.proxy.app import ProxySettings, create_app
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_events import EventEndpoints
from pd.proxy.routing import make_policy
from pd.proxy.tokenizer import import_in_background

_KEEPALIVE_EXPIRY_S = 2.0  # below vLLM's HTTP keep-alive (see _serve)

logger = logging.getLogger("pd.serve")


class RayInstanceSource:
    """Where a named instance serves now, asked of its Ray actor."""

    def __init__(self, cluster: Cluster) -> None:
        self._actors = {h.plan.name: h.actor for h in cluster.handles}

    async def locate(self, name: str) -> str | None:
        info = await self._actors[name].info.remote()
        return info.url if info.state == "ready" else None


class Stop(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: drain, stop everything, exit."""


def _raise_stop(signum, frame) -> None:
    raise Stop


def listen(host: str, port: int) -> socket.socket:
    """The proxy's listening socket, bound before anything starts: a port that is taken
    fails pd-serve at once, not after the instances took a minute to start, and nothing
    started meanwhile (Ray, vLLM: both bind ephemeral ports) can take it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return socket.create_server((host, port), family=family[0][0], backlog=2048)


def _listen_error(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return (
            f"proxy.port: {host}:{port} is already in use; stop what listens there or "
            "choose another port (proxy.port in cluster.yaml, or --port)"
        )
    return f"proxy.host/proxy.port: cannot listen on {host}:{port}: {error.strerror or error}"


def run_cluster(plan: ClusterPlan) -> int:
    setup_logging()
    config = plan.config
    try:
        listener = listen(config.proxy.host, config.proxy.port)
    except OSError as e:
        print(
            f"pd-serve: {_listen_error(config.proxy.host, config.proxy.port, e)}", file=sys.stderr
        )
        return 1
    with listener:
        return _run(plan, listener)


def _run(plan: ClusterPlan, listener: socket.socket) -> int:
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal once it has stopped;
    # both must then end in the clean shutdown below, not in Python's default exit.
    signal.signal(signal.SIGTERM, _raise_stop)
    config = plan.config
    cluster = Cluster(plan)
    for warning in plan.warnings:
        print(f"pd-serve: warning: {warning}", file=sys.stderr)
    print(f"pd-serve: starting {len(plan.instances)} instances (logs in {cluster.log_dir})")
    import_in_background()  # the proxy's tokenizer, while the instances start
    try:
        cluster.start(progress=lambda line: print(f"pd-serve: {line}", flush=True))
    except StartupError as e:
        print(f"pd-serve: start-up failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pd-serve: interrupted during start-up; stopped", file=sys.stderr)
        return 130
    signal.signal(signal.SIGTERM, _raise_stop)  # ray.init installed its own (sys.exit(15))
    try:
        return asyncio.run(_serve(cluster, plan, listener))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM after uvicorn drained
        return 0
    finally:
        print("pd-serve: stopping instances", flush=True)
        cluster.shutdown(grace_s=config.timeouts.drain_s)
        kv_events.remove_ipc_files([i.kv_events for i in plan.instances if i.kv_events])
        print("pd-serve: stopped", flush=True)


async def _serve(cluster: Cluster, plan: ClusterPlan, listener: socket.socket) -> int:
    config = plan.config
    # Idle connections are dropped before vLLM's server drops them (its keep-alive is
    # VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default): reusing one the server is closing
    # breaks the request sent on it.
    limits = httpx.Limits(
        max_connections=1000,
        max_keepalive_connections=200,
        keepalive_expiry=_KEEPALIVE_EXPIRY_S,
    )
    async with httpx.AsyncClient(limits=limits, timeout=None) as http:
        pool = InstancePool(
            [Instance(h.plan.name, h.plan.role) for h in cluster.handles],
            http,
            source=RayInstanceSource(cluster),
            health_interval_s=config.timeouts.health_interval_s,
            health_misses=config.timeouts.health_misses,
        )
        for handle in cluster.handles:
            pool.instances[handle.plan.name].url = (await handle.actor.info.remote()).url
        app = create_app(
            pool,
            make_policy(config.proxy.routing, **_policy_options(plan)),
            ProxySettings(
                served_model_name=config.served_model_name,
                request_timeout_s=config.timeouts.request_s,
                flow=config.proxy.flow,
                chat_output_parsed=_parses_chat_output(plan),
                max_body_bytes=config.proxy.max_body_bytes,
                max_n=config.proxy.max_n,
                max_model_len=_decode_max_model_len(plan),
                api_key=config.proxy.resolved_api_key(),
                tokenizer=_tokenizer_of(plan),
            ),
            http,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.proxy.host,
                port=config.proxy.port,
                log_level="warning",
                timeout_graceful_shutdown=int(config.timeouts.drain_s) or None,
            )
        )
        endpoint = f"http://{config.proxy.host}:{config.proxy.port}"
        key = ", API key required" if config.proxy.resolved_api_key() else ""
        print(f"pd-serve: OpenAI API at {endpoint}/v1 (model {config.served_model_name!r}{key})")
        dashboard = cluster.dashboard_url()
        auth = (
            " (token auth: paste the token from ~/.ray/auth_token, or run `ray get-auth-token`)"
            if Cluster.token_auth_enabled()
            else ""
        )
        print(f"pd-serve: Ray dashboard at {dashboard}{auth}")
        print("pd-serve: Ctrl-C to stop", flush=True)
        # What start-up made (Ray's driver, the app, the config) lives as long as the
        # proxy: frozen out of the collector's sight, a full collection scans only what
        # requests made since, and pauses the requests in flight (their routing) less.
        gc.collect()
        gc.freeze()
        await server.serve(sockets=[listener])
        return 0 if server.started else 1


def _policy_options(plan: ClusterPlan) -> dict[str, Any]:
    """What ``routing: kv_aware`` needs: its settings, each instance's KV event sockets,
    and how the instances hash blocks (their algorithm and PYTHONHASHSEED)."""
    config = plan.config
    if config.proxy.routing != "kv_aware":
        return {}
    return {
        "settings": config.proxy.kv_aware.settings(),
        "endpoints": {i.name: EventEndpoints(*i.kv_events) for i in plan.instances if i.kv_events},
        "hash_algorithm": kv_events.hash_algorithm(
            {**config.engine_args, **config.decode.engine_args}
        ),
        "hash_seed": kv_events.hash_seed(config.decode.env),
    }


def _tokenizer_of(plan: ClusterPlan) -> str:
    """What the instances tokenize with: vLLM's ``tokenizer`` argument, else the model.
    Routing policies that ask for a request's token ids get them from it."""
    config = plan.config
    tokenizer = {**config.engine_args, **config.decode.engine_args}.get("tokenizer")
    return str(tokenizer or plan.by_role("decode")[0].model)


def _decode_max_model_len(plan: ClusterPlan) -> int | None:
    """Decode's ``max_model_len`` when the config states it as a number (vLLM also takes
    forms like ``4k``; then only vLLM checks ``max_tokens`` against it)."""
    config = plan.config
    value = {**config.engine_args, **config.decode.engine_args}.get("max_model_len")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _parses_chat_output(plan: ClusterPlan) -> bool:
    """Whether any instance parses chat output (reasoning or tool calls)."""
    config = plan.config
    keys = {"reasoning_parser", "tool_call_parser", "enable_auto_tool_choice"}
    return any(
        args.get(key) not in (None, False, "")
        for args in (config.engine_args, config.prefill.engine_args, config.decode.engine_args)
        for key in keys
    )
