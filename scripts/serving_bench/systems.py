"""The systems compared, each started on the same model, cores and engine arguments.

colocated       one vLLM instance on both cores (chunked prefill on, as shipped)
pd-<transport>-<flow>
                pd-serve, prefill on core 0 and decode on core 1, with one transport
                (nixl, zmq) and one proxy flow (first-token, sequential, concurrent)
pd-nixl-sequential-nice15, pd-nixl-sequential-prefill-nice10
                (only when named) the same with the instances' CPU priority changed:
                both at Ray's worker default, or prefill below decode
pd-zmq-first-token-kv-aware
                (only when named) pd's default with ``routing: kv_aware``
vllm-pd-stock   vLLM prefill + decode with NixlConnector, behind the minimal proxy
                below (vLLM's disaggregation protocol), as shipped
vllm-pd-tuned   the same with its two CPU defects neutralized
                (scripts/vllm_pd_tuned/sitecustomize.py)
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from pd.serve_process import PdServeProcess, local_config
from pd.vllm_server import VllmServer, free_port

from .settings import Settings

TUNED_SITECUSTOMIZE = Path(__file__).resolve().parents[1] / "vllm_pd_tuned"

# name: (transport, flow, (prefill niceness, decode niceness))
PD_SYSTEMS = {
    "pd-nixl-first-token": ("nixl", "first-token", (0, 0)),
    "pd-zmq-first-token": ("zmq", "first-token", (0, 0)),
    "pd-nixl-sequential": ("nixl", "sequential", (0, 0)),
    "pd-zmq-sequential": ("zmq", "sequential", (0, 0)),
    "pd-nixl-concurrent": ("nixl", "concurrent", (0, 0)),
}
# What pd-serve runs on CPU instances when the config names no flow and no transport
# (``auto`` is ZMQ for a KV cache in host memory).
PD_DEFAULT = "pd-zmq-first-token"
# Not run by default: what the instances' CPU priority changes (Ray's worker default is 15).
PD_PRIORITY_VARIANTS = {
    "pd-nixl-sequential-nice15": ("nixl", "sequential", (15, 15)),
    "pd-nixl-sequential-prefill-nice10": ("nixl", "sequential", (10, 0)),
    # Prefill ahead of every unpinned process on its core (lowering niceness needs
    # CAP_SYS_NICE): the runs where either system backlogged had a starved prefill worker.
    "pd-zmq-first-token-prefill-nice-5": ("zmq", "first-token", (-5, 0)),
}
# Not run by default: pd's default with another routing policy (kv_aware's conditional
# disaggregation serves short prompts on decode alone, docs/routing.md).
PD_ROUTING_VARIANTS = {"pd-zmq-first-token-kv-aware": "kv_aware"}
DEFAULT_SYSTEMS = ["colocated", *PD_SYSTEMS, "vllm-pd-stock", "vllm-pd-tuned"]
ALL_SYSTEMS = [*DEFAULT_SYSTEMS, *PD_PRIORITY_VARIANTS, *PD_ROUTING_VARIANTS]


def system_order(name: str) -> int:
    return ALL_SYSTEMS.index(name) if name in ALL_SYSTEMS else len(ALL_SYSTEMS)


class System(ABC):
    name: str
    decode_url: str  # the vLLM instance that generates the tokens after the first
    prefill_url: str | None = None  # a P/D system's prefill instance
    is_pd = False  # behind pd's proxy: its metrics count first-token handoffs

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def start(self, model: Path, workdir: Path) -> str:
        """Start and return the OpenAI base URL once healthy."""

    @abstractmethod
    def stop(self) -> None:
        """End every process the system started (safe after a failed start)."""

    def _server(self, name: str, model: Path, workdir: Path, args: list[str],
                env: dict[str, str]) -> VllmServer:  # fmt: skip
        return VllmServer(
            name, str(model), args=[*self.settings.engine_args, *args],
            env={"VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gib), **env},
            log_path=workdir / f"{name}.log",
        ).start()  # fmt: skip


class Colocated(System):
    name = "colocated"
    server: VllmServer | None = None

    def start(self, model: Path, workdir: Path) -> str:
        self.server = self._server(
            self.name, model, workdir, [], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        )
        self.decode_url = self.server.wait_ready().url
        return self.decode_url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class PdServe(System):
    """pd-serve as a user runs it, on configs/local.yaml with the benchmark's model."""

    is_pd = True
    serve: PdServeProcess | None = None
    timeline: Path | None = None

    def __init__(
        self,
        settings: Settings,
        name: str,
        transport: str,
        flow: str,
        niceness: tuple[int, int],
        routing: str = "round_robin",
    ) -> None:
        super().__init__(settings)
        self.name = name
        self.transport = transport
        self.flow = flow
        self.niceness = niceness  # (prefill, decode): resources.niceness
        self.routing = routing

    def config(self, model: Path) -> dict[str, Any]:
        s = self.settings
        return local_config({
            "model": {"path": str(model), "preset": None, "served_name": s.served_name},
            # As the other systems run: local.yaml's enforce_eager left out.
            "engine_args": {"max_model_len": s.max_model_len, "dtype": "float32",
                            "enforce_eager": None},
            **{role: {"resources": {"cpus": 1, "cpu_kv_cache_gib": s.kv_cache_gib,
                                    "niceness": n}}
               for role, n in zip(("prefill", "decode"), self.niceness, strict=True)},
            "transport": self.transport,
            "proxy": {"flow": self.flow, "routing": self.routing},
        })  # fmt: skip

    def start(self, model: Path, workdir: Path) -> str:
        # pd.transfer.timeline: every pd process marks each request's steps (a few us a request);
        # the overhead probe splits its one-at-a-time requests' time with them.
        self.timeline = workdir / "timeline.jsonl"
        self.serve = (
            PdServeProcess(
                self.config(model), workdir=workdir, env={"PD_TIMELINE": str(self.timeline)}
            )
            .start()
            .wait_ready()
        )
        instances = self.serve.instances()
        self.prefill_url = instances["pd-prefill-0"].url
        self.decode_url = instances["pd-decode-0"].url
        return self.serve.url

    def stop(self) -> None:
        if self.serve is not None:
            self.serve.stop()


class StockVllmPD(System):
    """vLLM's own NixlConnector, prefill on core 0 and decode on core 1."""

    def __init__(self, settings: Settings, tuned: bool) -> None:
        super().__init__(settings)
        self.name = "vllm-pd-tuned" if tuned else "vllm-pd-stock"
        self.tuned = tuned
        self.servers: list[VllmServer] = []
        self.proxy: DisaggProxy | None = None

    def start(self, model: Path, workdir: Path) -> str:
        kv = json.dumps(
            {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        )
        env = {"PYTHONPATH": str(TUNED_SITECUSTOMIZE)} if self.tuned else {}
        for role, core in (("prefill", "0"), ("decode", "1")):
            self.servers.append(self._server(
                f"{self.name}-{role}", model, workdir, ["--kv-transfer-config", kv],
                {**env, "VLLM_CPU_OMP_THREADS_BIND": core,
                 "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
            ))  # fmt: skip
        for server in self.servers:
            server.wait_ready()
        prefill, decode = self.servers
        self.prefill_url, self.decode_url = prefill.url, decode.url
        self.proxy = DisaggProxy(prefill.url, decode.url)
        return self.proxy.start()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for server in self.servers:
            server.stop()


class DisaggProxy:
    """The minimal proxy the field uses in front of vLLM P/D: prefill with max_tokens=1
    and do_remote_decode, then decode with the returned kv_transfer_params, streamed.
    It runs in a thread of this process (the CPU table counts it as the harness)."""

    def __init__(self, prefill_url: str, decode_url: str) -> None:
        self.prefill_url, self.decode_url = prefill_url, decode_url
        self.port = free_port()

    def start(self, timeout_s: float = 30) -> str:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=None)

        async def completions(request: Request) -> Response:
            body = await request.json()
            first = {**body, "max_tokens": 1, "stream": False,
                     "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
            first.pop("stream_options", None)
            prefill = await client.post(f"{self.prefill_url}/v1/completions", json=first)
            params = prefill.json().get("kv_transfer_params")
            upstream = await client.send(
                client.build_request(
                    "POST", f"{self.decode_url}/v1/completions",
                    json={**body, "kv_transfer_params": params},
                ),
                stream=True,
            )  # fmt: skip
            if not body.get("stream"):
                data = await upstream.aread()
                await upstream.aclose()
                return JSONResponse(json.loads(data), upstream.status_code)

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()

            return StreamingResponse(relay(), media_type="text/event-stream")

        async def health(request: Request) -> Response:
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                Route("/health", health)])  # fmt: skip
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"stock P/D proxy not serving on {url}")
            time.sleep(0.1)
        return url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_system(name: str, settings: Settings) -> System:
    if name == "colocated":
        return Colocated(settings)
    if name in ("vllm-pd-stock", "vllm-pd-tuned"):
        return StockVllmPD(settings, tuned=name == "vllm-pd-tuned")
    if name in PD_ROUTING_VARIANTS:
        return PdServe(settings, name, *PD_SYSTEMS[PD_DEFAULT], routing=PD_ROUTING_VARIANTS[name])
    transport, flow, niceness = {**PD_SYSTEMS, **PD_PRIORITY_VARIANTS}[name]
    return PdServe(settings, name, transport, flow, niceness)
