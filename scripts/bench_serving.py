"""Serving benchmark: pd against one vLLM instance and against stock vLLM P/D.

Starts each system in turn on the same model (pd's ``small`` preset), the same two
cores and the same load, drives it with vLLM's own client (``vllm bench serve``,
random dataset), tears it down completely, and writes bench/results/serving.md,
serving.json and serving.png.

Systems:
  colocated       one vLLM instance on both cores (chunked prefill on, as shipped)
  pd-<transport>-<flow>
                  pd-serve, prefill on core 0 and decode on core 1, with one transport
                  (nixl, zmq) and one proxy flow (first-token, sequential, concurrent)
  pd-nixl-sequential-nice15, pd-nixl-sequential-prefill-nice10
                  (only when named) the same with the instances' CPU priority changed:
                  both at Ray's worker default, or prefill below decode
  vllm-pd-stock   vLLM prefill + decode with NixlConnector, behind the minimal proxy
                  below (vLLM's disaggregation protocol), as shipped
  vllm-pd-tuned   the same with its two CPU defects neutralized
                  (scripts/vllm_pd_tuned/sitecustomize.py)

    .venv/bin/python scripts/bench_serving.py [--duration-s 30] [--systems ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import httpx
from cpu_meter import CpuMeter

from pd.models import make_model
from pd.vllm_server import VllmServer, free_port

REPO = Path(__file__).resolve().parents[1]
SERVED = "small"
ENGINE_ARGS = ["--max-model-len", "4096", "--dtype", "float32", "--served-model-name", SERVED]
KV_CACHE_GIB = "2"
# SLO for goodput (DistServe: a request counts if it meets both bounds).
SLO_TTFT_MS, SLO_TPOT_MS = 2000, 100


@dataclass(frozen=True)
class Load:
    """One `vllm bench serve` stream."""

    input_len: int
    output_len: int
    rate: float


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    main: Load  # the stream whose metrics are reported
    background: Load | None = None  # runs alongside, e.g. long prefills during decode


def workloads() -> list[Workload]:
    return [
        Workload("prefill-heavy@1", "1024-token prompts, 16 output tokens, 1 req/s",
                 Load(1024, 16, 1.0)),
        Workload("prefill-heavy@2", "1024-token prompts, 16 output tokens, 2 req/s",
                 Load(1024, 16, 2.0)),
        Workload("decode-heavy@2", "64-token prompts, 128 output tokens, 2 req/s",
                 Load(64, 128, 2.0)),
        Workload("decode-heavy@4", "64-token prompts, 128 output tokens, 4 req/s",
                 Load(64, 128, 4.0)),
        Workload("mixed@1", "decode stream (64 in, 128 out, 2 req/s) while 1024-token "
                 "prompts arrive at 0.5 req/s; metrics of the decode stream",
                 Load(64, 128, 2.0), background=Load(1024, 16, 0.5)),
        Workload("mixed@2", "decode stream (64 in, 128 out, 3 req/s) while 1024-token "
                 "prompts arrive at 1 req/s; metrics of the decode stream",
                 Load(64, 128, 3.0), background=Load(1024, 16, 1.0)),
    ]  # fmt: skip


# --- systems --------------------------------------------------------------------------------


class System:
    name: str
    decode_url: str  # the vLLM instance that generates the tokens after the first

    def start(self, model: Path, workdir: Path) -> str:
        """Start and return the OpenAI base URL once healthy."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _server(name, model, workdir, args, env) -> VllmServer:
    return VllmServer(
        name, str(model), args=[*ENGINE_ARGS, *args],
        env={"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, **env}, log_path=workdir / f"{name}.log",
    ).start()  # fmt: skip


class Colocated(System):
    name = "colocated"

    def start(self, model: Path, workdir: Path) -> str:
        self.server = _server("colocated", model, workdir, [], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
        self.decode_url = self.server.wait_ready().url
        return self.decode_url

    def stop(self) -> None:
        self.server.stop()


class PdServe(System):
    def __init__(self, name: str, transport: str, flow: str, niceness: tuple[int, int]) -> None:
        self.name = name
        self.transport = transport
        self.flow = flow
        self.niceness = niceness  # (prefill, decode): resources.niceness

    def start(self, model: Path, workdir: Path) -> str:
        port = free_port()
        config = workdir / f"{self.name}.yaml"
        config.write_text(
            json.dumps(
                {
                    "model": {"path": str(model), "served_name": SERVED},
                    "engine_args": {"max_model_len": 4096, "dtype": "float32"},
                    **{
                        role: {"resources": {"cpus": 1, "cpu_kv_cache_gib": 2, "niceness": n}}
                        for role, n in zip(("prefill", "decode"), self.niceness, strict=True)
                    },
                    "transport": self.transport,
                    "proxy": {"port": port, "flow": self.flow},
                    "ray": {"dashboard_port": free_port()},
                }
            )
        )
        self.log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [Path(sys.executable).with_name("pd-serve"), "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, self.proc, workdir / f"{self.name}.log")
        self.decode_url = self._instance_url(workdir, "pd-decode-0")
        return url

    def prefill_url(self, workdir: Path) -> str:
        return self._instance_url(workdir, "pd-prefill-0")

    def _instance_url(self, workdir: Path, instance: str) -> str:
        text = (workdir / f"{self.name}.log").read_text()
        line = next(x for x in text.splitlines() if f"{instance}: starting vLLM at" in x)
        return line.split(" at ")[1].split(" ")[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class StockVllmPD(System):
    """vLLM's own NixlConnector, prefill on core 0 and decode on core 1."""

    def __init__(self, tuned: bool) -> None:
        self.name = "vllm-pd-tuned" if tuned else "vllm-pd-stock"
        self.tuned = tuned

    def start(self, model: Path, workdir: Path) -> str:
        kv = json.dumps(
            {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        )
        env_common = {}
        if self.tuned:
            env_common["PYTHONPATH"] = str(REPO / "scripts" / "vllm_pd_tuned")
        self.servers = [
            _server(f"{self.name}-{role}", model, workdir, ["--kv-transfer-config", kv],
                    {**env_common, "VLLM_CPU_OMP_THREADS_BIND": core,
                     "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())})
            for role, core in (("prefill", "0"), ("decode", "1"))
        ]  # fmt: skip
        for server in self.servers:
            server.wait_ready()
        self.decode_url = self.servers[1].url
        self.proxy = DisaggProxy(self.servers[0].url, self.servers[1].url)
        return self.proxy.start()

    def stop(self) -> None:
        self.proxy.stop()
        for server in self.servers:
            server.stop()


class DisaggProxy:
    """The minimal proxy the field uses in front of vLLM P/D: prefill with max_tokens=1
    and do_remote_decode, then decode with the returned kv_transfer_params, streamed."""

    def __init__(self, prefill_url: str, decode_url: str) -> None:
        self.prefill_url, self.decode_url = prefill_url, decode_url
        self.port = free_port()

    def start(self) -> str:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=None)

        async def completions(request: Request):
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

            async def relay():
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()

            return StreamingResponse(relay(), media_type="text/event-stream")

        async def health(request: Request):
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                Route("/health", health)])  # fmt: skip
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        url = f"http://127.0.0.1:{self.port}"
        _wait_healthy(url, None, None)
        return url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _wait_healthy(url: str, proc, log: Path | None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-3000:] if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy in {timeout_s}s")


# --- load -------------------------------------------------------------------------------


def bench_serve(
    url: str, model: Path, load: Load, duration_s: float, out: Path, seed: int
) -> subprocess.Popen:
    num_prompts = max(4, int(load.rate * duration_s))
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", SERVED, "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(load.input_len),
        "--random-output-len", str(load.output_len), "--ignore-eos",
        "--request-rate", str(load.rate), "--num-prompts", str(num_prompts), "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--goodput", f"ttft:{SLO_TTFT_MS}", f"tpot:{SLO_TPOT_MS}",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_workload(
    url: str, model: Path, workload: Workload, duration_s: float, workdir: Path, seed: int
):
    """``seed`` differs per workload: no run may hit prefixes an earlier run cached."""
    main_out = workdir / f"{workload.name}.json"
    procs = [bench_serve(url, model, workload.main, duration_s, main_out, seed=seed)]
    if workload.background:
        procs.append(
            bench_serve(url, model, workload.background, duration_s,
                        workdir / f"{workload.name}-bg.json", seed=seed + 1000)
        )  # fmt: skip
    limit_s = duration_s * 3 + 45  # past this the system is overloaded: say so, move on
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return {"error": f"did not finish in {limit_s:.0f}s (overloaded)"}
        if proc.returncode != 0:
            return {"error": output.decode(errors="replace")[-1500:]}
    return json.loads(main_out.read_text())


_SETTLE_S = 0.3  # before each timed request, after the previous one's bookkeeping


def pd_overhead(system: PdServe, url: str, workdir: Path, num_prompts: int = 40) -> dict:
    """One request at a time: pd's TTFT against the prefill instance's own time.

    In the first-token flow, requests whose first token went out with the prefill
    answer are reported apart from those that went sequentially (a first token that
    is part of a character, frequent with the random-weight byte-level model)."""
    prefill_url = system.prefill_url(workdir)
    prompts = [[(i * 31 + j * 7) % 250 for j in range(1024)] for i in range(num_prompts)]
    own, ttft, second, handed_off, legs = [], [], [], [], []
    decode_side: list[dict[str, float]] = []
    with httpx.Client(timeout=60) as client:
        # Interleaved, so that a machine getting faster or slower biases neither side.
        handoffs = _first_token_handoffs(url)
        decode_sums = _decode_sums(system.decode_url)
        for prompt in prompts:
            body = {"model": SERVED, "prompt": prompt, "max_tokens": 1}
            time.sleep(_SETTLE_S)
            started = time.perf_counter()
            client.post(f"{prefill_url}/v1/completions", json=body).raise_for_status()
            own.append(time.perf_counter() - started)
            shifted = [(t + 1) % 250 for t in prompt]  # no prefix-cache hit from above
            body = {"model": SERVED, "prompt": shifted, "max_tokens": 2, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            time.sleep(_SETTLE_S)
            started = time.perf_counter()
            arrivals = []
            with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    # A token's event, even if its text is held back (part of a character)
                    if line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                        arrivals.append(time.perf_counter() - started)
            if not arrivals:
                raise RuntimeError(f"no token events in the answer ({response.status_code})")
            ttft.append(arrivals[0])
            second.append(arrivals[-1])  # vLLM may send both tokens in one event
            # Scraped after the timed request: /metrics makes every instance render its own.
            before_request, handoffs = handoffs, _first_token_handoffs(url)
            handed_off.append(handoffs[0] > before_request[0])
            legs.append(handoffs[2] - before_request[2])
            before_sums, decode_sums = decode_sums, _decode_sums(system.decode_url)
            decode_side.append({k: decode_sums[k] - before_sums[k] for k in decode_sums})
        before = _own_time_buckets(client, url)
        for prompt in prompts:
            body = {"model": SERVED, "prompt": prompt[:64], "max_tokens": 1}
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
        own_time = _bucket_quantile_ms(before, _own_time_buckets(client, url), 0.5)
    own_ms = 1000 * statistics.median(own[4:])  # the first ones warm both paths up

    def p50_ms(values: list[float], which: bool | None = None) -> float | None:
        kept = [v for v, h in zip(values[4:], handed_off[4:], strict=True)
                if which is None or h == which]  # fmt: skip
        return 1000 * statistics.median(kept) if kept else None

    ttft_ms = p50_ms(ttft)
    # Paired: each request's TTFT minus its own prefill leg, as the proxy timed it.
    paired = [t - leg for t, leg in zip(ttft, legs, strict=True)]
    result = {"prefill_own_p50_ms": own_ms, "pd_ttft_p50_ms": ttft_ms,
              "overhead_p50_ms": ttft_ms - own_ms, "proxy_own_p50_ms_at_most": own_time,
              "second_token_p50_ms": p50_ms(second),
              "paired_overhead_p50_ms": p50_ms(paired)}  # fmt: skip
    # Where the sequential path's time goes, as the decode instance saw each request.
    for key in DECODE_SUMS:
        result[f"decode_{key}_p50_ms"] = p50_ms([d[key] for d in decode_side], False)
    if any(handed_off):
        result["first_token_handoffs"] = f"{sum(handed_off[4:])} of {len(handed_off[4:])}"
        for which, key in ((True, "handed_off"), (False, "sequential")):
            if (ms := p50_ms(ttft, which)) is not None:
                result[f"{key}_overhead_p50_ms"] = ms - own_ms
                result[f"{key}_paired_overhead_p50_ms"] = p50_ms(paired, which)
                result[f"{key}_second_token_p50_ms"] = p50_ms(second, which)
    return result


def _first_token_handoffs(url: str) -> tuple[float, float, float]:
    """(requests so far whose first token came from the prefill leg, requests so far,
    seconds spent in prefill legs so far)."""
    handoffs = answered = prefill_s = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("pd_first_token_handoffs_total "):
            handoffs = float(line.split()[1])
        elif line.startswith("pd_requests_total{") and 'status="200"' in line:
            answered += float(line.rsplit(" ", 1)[1])
        elif line.startswith("pd_prefill_seconds_sum "):
            prefill_s = float(line.split()[1])
    return handoffs, answered, prefill_s


DECODE_SUMS = {
    "ttft": "vllm:time_to_first_token_seconds_sum",  # the decode server got it -> 1st token
    "queue": "vllm:request_queue_time_seconds_sum",  # waiting, the KV load included
}


def _decode_sums(decode_url: str) -> dict[str, float]:
    """The decode instance's running totals of DECODE_SUMS (one request's share is the
    difference across it)."""
    totals = dict.fromkeys(DECODE_SUMS, 0.0)
    for line in httpx.get(f"{decode_url}/metrics", timeout=30).text.splitlines():
        for key, name in DECODE_SUMS.items():
            if line.startswith(name):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


def _share(before: tuple[float, ...], after: tuple[float, ...]) -> str:
    return f"{after[0] - before[0]:.0f} of {after[1] - before[1]:.0f}"


def _own_time_buckets(client: httpx.Client, url: str) -> dict[float, float]:
    """The proxy's pd_proxy_overhead_seconds histogram: upper bound -> cumulative count."""
    return _histogram(client.get(f"{url}/metrics").text, "pd_proxy_overhead_seconds")


def _engine_itl_buckets(decode_url: str) -> dict[float, float]:
    """The decode instance's vllm:inter_token_latency_seconds: the gaps between a
    request's tokens as its engine core produced them (before any IPC, HTTP or proxy)."""
    text = httpx.get(f"{decode_url}/metrics", timeout=30).text
    return _histogram(text, "vllm:inter_token_latency_seconds")


def _histogram(metrics_text: str, name: str) -> dict[float, float]:
    """Prometheus histogram ``name``, summed over its label sets: bound -> cumulative count."""
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            bound = float(line.split('le="')[1].split('"')[0])
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def _bucket_quantile_ms(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding a share ``q`` of the observations between two
    scrapes: an upper bound of the quantile."""
    delta = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    for bound, count in delta.items():
        if total and count >= q * total:
            return 1000 * bound
    return float("nan")


# --- report -------------------------------------------------------------------------------


# name: (transport, flow, (prefill niceness, decode niceness))
PD_SYSTEMS = {
    "pd-nixl-first-token": ("nixl", "first-token", (0, 0)),
    "pd-zmq-first-token": ("zmq", "first-token", (0, 0)),
    "pd-nixl-sequential": ("nixl", "sequential", (0, 0)),
    "pd-nixl-concurrent": ("nixl", "concurrent", (0, 0)),
}
# Not run by default: what the instances' CPU priority changes (Ray's worker default is 15).
PD_PRIORITY_VARIANTS = {
    "pd-nixl-sequential-nice15": ("nixl", "sequential", (15, 15)),
    "pd-nixl-sequential-prefill-nice10": ("nixl", "sequential", (10, 0)),
}
DEFAULT_SYSTEMS = ["colocated", *PD_SYSTEMS, "vllm-pd-stock", "vllm-pd-tuned"]
ALL_SYSTEMS = [*DEFAULT_SYSTEMS, *PD_PRIORITY_VARIANTS]


def _order(system: str) -> int:
    return ALL_SYSTEMS.index(system) if system in ALL_SYSTEMS else len(ALL_SYSTEMS)


def write_report(results: dict, overhead: dict, commands: list[str], args, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(
        {"results": results, "overhead": overhead, "commands": commands}, indent=2))  # fmt: skip
    lines = [
        "# Serving benchmark", "", *(f"Command: `{c}`" for c in commands), "",
        f"Model: pd's `small` preset (8 layers, 8 KiB of KV per token, float32). Two cores. "
        f"Each workload runs about {args.duration_s:g} s of arrivals (`vllm bench serve`, "
        f"random dataset, ignore_eos). Goodput SLO: TTFT <= {SLO_TTFT_MS} ms and "
        f"TPOT <= {SLO_TPOT_MS} ms.", "",
        "| workload | system | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | TPOT p50/p90/p99 ms "
        "| req/s | out tok/s | goodput req/s | TTFT p50 vs colocated | vs vLLM P/D best |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for workload in workloads():
        rows = results.get(workload.name, {})
        base = rows.get("colocated", {})
        stock = [rows.get(s, {}) for s in ("vllm-pd-stock", "vllm-pd-tuned")]
        best = min((r["p50_ttft_ms"] for r in stock if "p50_ttft_ms" in r), default=None)
        for system, r in sorted(rows.items(), key=lambda item: _order(item[0])):
            if "error" in r:
                lines.append(f"| {workload.name} | {system} | failed: {r['error'][:80]!r} |"
                             " | | | | | | |")  # fmt: skip
                continue

            def trio(metric: str, r=r) -> str:
                return "/".join(f"{r[f'p{p}_{metric}_ms']:.0f}" for p in (50, 90, 99))

            vs_base = (f"{r['p50_ttft_ms'] / base['p50_ttft_ms']:.2f}x"
                       if base.get("p50_ttft_ms") else "")  # fmt: skip
            vs_stock = f"{r['p50_ttft_ms'] / best:.2f}x" if best else ""
            lines.append(
                f"| {workload.name} | {system} | {trio('ttft')} | {trio('itl')} | "
                f"{trio('tpot')} | {r['request_throughput']:.2f} | "
                f"{r['output_throughput']:.0f} | {r.get('request_goodput', 0) or 0:.2f} | "
                f"{vs_base} | {vs_stock} |"
            )
    nan = float("nan")
    lines += ["", "Workloads:"] + [f"- {w.name}: {w.description}" for w in workloads()]
    shares = [f"{w.name} {system}: {r['first_token_handoffs']}"
              for w in workloads() for system, r in results.get(w.name, {}).items()
              if r.get("first_token_handoffs") is not None and "first-token" in system]  # fmt: skip
    if shares:
        lines += ["", "Requests whose first token came from the prefill leg, of all answered "
                  "(both streams of a mixed workload; the others went sequentially): "
                  + "; ".join(shares)]  # fmt: skip
    if overhead:
        lines += ["", "P/D overhead, one request at a time (1024-token prompts):", ""]
        for system, o in overhead.items():
            lines.append(
                f"- {system}: TTFT p50 {o['pd_ttft_p50_ms']:.1f} ms, the prefill instance's "
                f"own time {o['prefill_own_p50_ms']:.1f} ms: overhead "
                f"{o['overhead_p50_ms']:.1f} ms; second token at "
                f"{o.get('second_token_p50_ms') or float('nan'):.1f} ms; paired (each "
                f"request's TTFT minus its own prefill leg as the proxy timed it) "
                f"{o.get('paired_overhead_p50_ms') or nan:.1f} ms; the proxy's own time "
                f"p50 <= {o.get('proxy_own_p50_ms_at_most', nan):g} ms"
            )
            if o.get("decode_ttft_p50_ms") is not None:
                lines.append(
                    f"  - requests through decode (sequential path), as the decode instance "
                    f"timed them: its vLLM server got the request -> first token "
                    f"{o['decode_ttft_p50_ms']:.1f} ms, of which waiting to be scheduled "
                    f"(the KV load included) {o['decode_queue_p50_ms']:.1f} ms"
                )
            if "handed_off_overhead_p50_ms" in o:
                lines.append(
                    f"  - first token from the prefill leg for {o['first_token_handoffs']} "
                    f"requests: their overhead {o.get('handed_off_overhead_p50_ms', nan):.1f} ms,"
                    f" second token at {o.get('handed_off_second_token_p50_ms') or nan:.1f} ms;"
                    f" the others (sequential) {o.get('sequential_overhead_p50_ms', nan):.1f} ms;"
                    f" paired {o.get('handed_off_paired_overhead_p50_ms') or nan:.1f} and "
                    f"{o.get('sequential_paired_overhead_p50_ms') or nan:.1f} ms"
                )
    lines += cpu_table(results)
    lines += itl_table(results)
    lines += ["", "![TTFT and ITL percentiles](serving.png)", ""]
    report = out_dir / "serving.md"
    # The written analysis below the generated part survives a rerun (to be updated by hand).
    analysis = report.read_text().partition(ANALYSIS)[2] if report.exists() else ""
    if analysis:
        lines += ["", ANALYSIS + analysis.rstrip("\n")]
    report.write_text("\n".join(lines) + "\n")
    chart(results, out_dir / "serving.png")


ANALYSIS = "## What the numbers show"


def itl_table(results: dict) -> list[str]:
    """Where the inter-token time goes: the gaps as the decode engine produced them
    against the gaps the client saw, and how long the decode worker waited for a core."""
    lines = ["", "Where the inter-token time goes: ITL as the client saw it, against the gaps "
             "between tokens as the decode instance's engine produced them (vLLM's "
             "`vllm:inter_token_latency_seconds`, every request on that instance, read as "
             "bucket upper bounds), and how long threads were runnable but waited for a core "
             "(ms per second of run, from /proc schedstat).", "",
             "| workload | system | client ITL p50/p90/p99 ms | engine ITL p50/p90/p99 ms "
             "(at most) | decode worker waited | vLLM's other processes waited | "
             "everything else waited |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for workload in workloads():
        for system, r in sorted(results.get(workload.name, {}).items(),
                                key=lambda item: _order(item[0])):  # fmt: skip
            if "engine_itl_ms_at_most" not in r:
                continue
            decode_worker = f"vLLM worker [cores {'0-1' if system == 'colocated' else '1'}]"
            waits = r.get("run_queue_wait", {})
            worker = waits.get(decode_worker, 0.0)
            vllm = sum(v for g, v in waits.items() if g.startswith("vLLM ")) - worker
            rest = sum(v for g, v in waits.items() if not g.startswith("vLLM "))
            client = "/".join(f"{r[f'p{q}_itl_ms']:.0f}" for q in (50, 90, 99))
            engine = "/".join(f"{v:g}" for v in r["engine_itl_ms_at_most"].values())
            waited = " | ".join(f"{1000 * v:.0f}" for v in (worker, vllm, rest))
            lines.append(f"| {workload.name} | {system} | {client} | {engine} | {waited} |")
    return lines if len(lines) > 5 else []


CPU_COLUMNS = {
    "model workers": lambda g: g.startswith("vLLM worker"),
    "vLLM engine cores, API servers": lambda g: g.startswith("vLLM "),
    "Ray, pd's actors": lambda g: g.startswith(("Ray", "pd instance")),
    "proxy": lambda g: g.startswith(("pd-serve", "harness")),
    "load generator": lambda g: g.startswith("load generator"),
    "other": lambda g: True,
}


def cpu_table(results: dict) -> list[str]:
    """Cores busy per kind of process while each workload ran (2.0 = both cores)."""
    lines = ["", "Where the CPU went: cores busy per kind of process during each run, "
             "out of 2 (scripts/cpu_meter.py; the proxy of stock vLLM P/D runs in the "
             "harness process).", "",
             "| workload | system | " + " | ".join(CPU_COLUMNS) + " | idle |",
             "| --- | --- |" + " ---: |" * (len(CPU_COLUMNS) + 1)]  # fmt: skip
    for workload in workloads():
        for system, r in sorted(results.get(workload.name, {}).items(),
                                key=lambda item: _order(item[0])):  # fmt: skip
            if "cpu_cores" not in r:
                continue
            sums = dict.fromkeys(CPU_COLUMNS, 0.0)
            for group, cores in r["cpu_cores"].items():
                column = next(c for c, match in CPU_COLUMNS.items() if match(group))
                sums[column] += cores
            idle = max(0.0, 2.0 - sum(sums.values()))
            cells = " | ".join(f"{v:.2f}" for v in [*sums.values(), idle])
            lines.append(f"| {workload.name} | {system} | {cells} |")
    return lines if len(lines) > 5 else []


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w.name for w in workloads() if w.name in results]
    if not names:
        return
    systems = sorted({s for rows in results.values() for s in rows}, key=_order)
    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    width = 0.8 / max(1, len(systems))
    for ax, metric in zip(axes, ("ttft", "itl"), strict=True):
        for i, system in enumerate(systems):
            for j, pct in enumerate((50, 99)):
                values = [results[n].get(system, {}).get(f"p{pct}_{metric}_ms", 0) for n in names]
                xs = [k + i * width for k in range(len(names))]
                ax.bar(xs, values, width * (0.9 if j else 0.5), alpha=0.5 if j else 1.0,
                       label=f"{system} p{pct}", color=f"C{i}")  # fmt: skip
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names)
        ax.set_ylabel(f"{metric.upper()} ms (log)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=len(systems))
    fig.suptitle("TTFT and ITL percentiles: p50 solid, p99 faded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=ALL_SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=[w.name for w in workloads()])
    parser.add_argument("--duration-s", type=float, default=30)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the serving.json in --out-dir that this run does not "
        "redo (other systems or workloads; both commands are recorded)",
    )
    args = parser.parse_args()
    if shutil.which("pgrep") and subprocess.run(["pgrep", "-f", "vllm serve"]).returncode == 0:
        print("warning: another `vllm serve` is running; results will be disturbed")
    model = make_model("small")
    factories = {"colocated": Colocated,
                 "vllm-pd-stock": lambda: StockVllmPD(tuned=False),
                 "vllm-pd-tuned": lambda: StockVllmPD(tuned=True)}  # fmt: skip
    for name, spec in {**PD_SYSTEMS, **PD_PRIORITY_VARIANTS}.items():
        factories[name] = lambda name=name, spec=spec: PdServe(name, *spec)
    results: dict[str, dict[str, dict]] = {}
    overhead: dict[str, dict] = {}
    commands = []
    if args.merge and (args.out_dir / "serving.json").exists():
        earlier = json.loads((args.out_dir / "serving.json").read_text())
        for workload, rows in earlier["results"].items():
            for system, row in rows.items():
                if system not in args.systems or workload not in args.workloads:
                    results.setdefault(workload, {})[system] = row
        overhead = {k: v for k, v in earlier["overhead"].items() if k not in args.systems}
        commands = earlier.get("commands", [])
    commands.append(("python scripts/bench_serving.py " + " ".join(sys.argv[1:])).strip())
    for name in args.systems:
        system = factories[name]()
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        print(f"== {name} (logs in {workdir})", flush=True)
        try:
            url = system.start(model, workdir)
            for index, workload in enumerate(workloads()):
                if workload.name not in args.workloads:
                    continue
                seed = 100 + index  # the same prompts for every system
                handoffs = _first_token_handoffs(url) if isinstance(system, PdServe) else None
                itl_before = _engine_itl_buckets(system.decode_url)
                with CpuMeter() as meter:
                    result = run_workload(url, model, workload, args.duration_s, workdir, seed)
                result["cpu_cores"] = {g: round(v / meter.wall_s, 3)
                                       for g, v in meter.seconds.items()}  # fmt: skip
                result["run_queue_wait"] = {g: round(v / meter.wall_s, 4)
                                            for g, v in meter.waited_s.items()}  # fmt: skip
                itl_after = _engine_itl_buckets(system.decode_url)
                result["engine_itl_ms_at_most"] = {
                    f"p{q}": _bucket_quantile_ms(itl_before, itl_after, q / 100)
                    for q in (50, 90, 99)
                }
                if handoffs is not None and result.get("completed"):
                    result["first_token_handoffs"] = _share(handoffs, _first_token_handoffs(url))
                results.setdefault(workload.name, {})[name] = result
                shown = result.get("error") or (
                    f"TTFT p50 {result['p50_ttft_ms']:.0f} ms, "
                    f"ITL p99 {result['p99_itl_ms']:.0f} ms"
                )
                print(f"   {workload.name}: {shown}", flush=True)
            if isinstance(system, PdServe):
                overhead[name] = pd_overhead(system, url, workdir)
                print(f"   overhead: {overhead[name]}", flush=True)
        except Exception as e:
            print(f"   {name} failed: {e!r}", flush=True)
            traceback.print_exc()
            for workload in workloads():
                results.setdefault(workload.name, {}).setdefault(name, {"error": str(e)[:300]})
        finally:
            system.stop()
    write_report(results, overhead, commands, args, args.out_dir)
    print(f"wrote {args.out_dir / 'serving.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
