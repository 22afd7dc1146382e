"""Fault and load scenarios against a real pd-serve, shared by tests/test_faults.py and
scripts/reliability.py.

``PdServe`` starts pd-serve (real Ray actors, real vLLM engines) on a config derived
from configs/local.yaml, finds each instance's vLLM server among its descendants
(pid, URL), and reads the proxy's health, metrics, connections and memory. A scenario
is an async function that injects one fault with signals on the real processes
(SIGKILL: a crash; SIGSTOP: a process that stops answering; SIGCONT: it recovers),
sends requests around it and records what happened in a ``ScenarioResult``.
``run_scenario`` then restores the cluster (every instance continued, in rotation)
and checks what every fault must leave behind: no KV blocks held on any instance,
no leaked proxy connections.

Every request a scenario sends ends in exactly one outcome:

  completed  HTTP 200 and a well-formed answer of the requested length: JSON with
             ``usage.completion_tokens == max_tokens``, or a stream in which every
             event parses, the usage chunk says ``max_tokens`` and ``data: [DONE]``
             comes last
  error      a clear error: an HTTP error status with an OpenAI error body
             (``{"error": {"message": ...}}``), or a stream whose events all parse and
             whose last event (before an optional ``[DONE]``) is such an error object
  lost       anything else: a connection dropped without an answer, a malformed or
             truncated body or stream, a 200 of the wrong length
  hung       no end within the client's deadline (the request is abandoned)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from pd.vllm_server import free_port, parse_prometheus

REPO = Path(__file__).resolve().parents[1]
SERVED = "pd-tiny"

# configs/local.yaml with deadlines short enough that faults resolve in seconds, and
# the tiny model's whole context (4096): a stream long enough to outlast its deadline
# even on a fast machine.
FAULT_MAX_MODEL_LEN = 4096
FAULT_OVERRIDES: dict[str, Any] = {
    "engine_args": {"max_model_len": FAULT_MAX_MODEL_LEN},
    "timeouts": {"health_interval_s": 1, "request_s": 20, "drain_s": 5},
    "connector": {"handshake_timeout_s": 2, "transfer_timeout_s": 4, "lease_timeout_s": 10},
    "ray": {"max_restarts": 20},
}

# How long a crashed instance may take to come back (a fresh actor and vLLM server,
# on two shared cores), and how long anything else may take to settle.
REJOIN_S = 300
SETTLE_S = 30
# "Never hangs" bounds: how much longer than the configured deadline a request may take
# before it counts as hung. Generous (the two cores are shared, engines can crawl), yet
# far below what a request with no working deadline takes.
PROXY_SLACK_S = 20  # the proxy acts on a deadline (it is never starved for long)
ENGINE_SLACK_S = 60  # an engine must also compute something (recompute a prompt)
CONNECTION_TOLERANCE = 4  # idle keep-alive connections the proxy may hold beyond baseline


# --- pd-serve ------------------------------------------------------------------------------


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def derived_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """configs/local.yaml with ``overrides`` merged in."""
    base = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    return deep_merge(base, overrides)


@dataclass(frozen=True)
class VllmInstance:
    """One instance's ``vllm serve`` process (its process group holds the engine too)."""

    name: str  # pd-prefill-0, ...
    role: str
    pid: int
    url: str

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        response = await http.get(f"{self.url}/metrics", timeout=10)
        return parse_prometheus(response.text)

    async def kv_blocks_used(self, http: httpx.AsyncClient) -> int:
        """KV blocks held (running requests, leases), from vLLM's own /metrics."""
        text = (await http.get(f"{self.url}/metrics", timeout=10)).text
        usage = parse_prometheus(text)["vllm:kv_cache_usage_perc"]
        match = re.search(r'num_gpu_blocks="(\d+)"', text)
        total = int(match.group(1)) if match else 0
        return round(usage * total) if total else (0 if usage == 0 else -1)


class Throttle:
    """Slows an instance down without silencing it: tests/throttle.py, as its own
    process, continues the instance's process group for ``run_s`` and stops it for
    ``stop_s``, in turns.

    Scenarios that need a request still running when a fault strikes throttle decode
    before they send it. Anything this client times by the events it has read runs
    late on a loaded machine: it reads late while decode runs unchecked, and streams
    finished before the fault (a pacer in the test's event loop; a throttle started at
    the first event read, which came 7 s late once, after a whole 1500-token stream)."""

    # Decode runs 1/21 of the time: at 250 tokens/s unthrottled a 1500-token stream
    # needs over 120 s. Stopped at most 0.6 s at a time, under the proxy's 2 s
    # health-check timeout, so health checks keep the instance in rotation.
    RUN_S, STOP_S = 0.03, 0.6

    def __init__(self, instance: VllmInstance) -> None:
        self.instance = instance
        self.process: subprocess.Popen[str] | None = None
        self.ended = False  # start() after end() must not restart it

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        """Starts the throttle, once."""
        if self.process is None and not self.ended:
            script = str(Path(__file__).with_name("throttle.py"))
            pgid, run_s, stop_s = self.instance.pid, self.RUN_S, self.STOP_S
            args = [sys.executable, script, str(pgid), str(run_s), str(stop_s)]
            self.process = subprocess.Popen(
                args, stdout=subprocess.PIPE, text=True, start_new_session=True
            )

    async def end(self, *, leave_stopped: bool = False) -> str:
        """Ends the throttle, leaving the instance running or (``leave_stopped``)
        stopped, and describes what it did."""
        self.ended = True
        if self.process is None:
            return f"{self.instance.name} was never throttled"
        self.process.send_signal(signal.SIGUSR1 if leave_stopped else signal.SIGTERM)
        report, _ = await asyncio.to_thread(self.process.communicate, timeout=10)
        self.process = None
        # Again here, in case the signal came before the throttle set its handlers up.
        if leave_stopped:
            self.instance.stop()
        else:
            self.instance.resume()
        if not report:
            return f"{self.instance.name}: the throttle ended before its first cycle"
        cycles, longest, scheduling = [*report.split(), "?", "?", "?"][:3]
        return (
            f"{self.instance.name} throttled for {cycles} cycles of {self.RUN_S * 1000:.0f} ms "
            f"run, {self.STOP_S * 1000:.0f} ms stopped (longest run window {longest} s, "
            f"throttle scheduling {scheduling})"
        )


class PdServe:
    """pd-serve as a user starts it, on a temporary config derived from local.yaml."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pd-reliability-"))
        self.port = free_port()
        # Own proxy and dashboard ports: other pd clusters may run on this host.
        self.config = deep_merge(
            config, {"proxy": {"port": self.port}, "ray": {"dashboard_port": free_port()}}
        )
        self.config_path = self.workdir / "cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "pd-serve.log"
        self.proc: subprocess.Popen | None = None
        self.ports_seen: set[int] = set()  # every vLLM port any instance ever served on

    @property
    def request_s(self) -> float:
        return float(self.config["timeouts"]["request_s"])

    @property
    def connector(self) -> dict[str, float]:
        return self.config["connector"]

    def start(self) -> PdServe:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [Path(sys.executable).with_name("pd-serve"), "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 600) -> PdServe:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pd-serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                # "ok": both roles in rotation ("degraded" serves on decode alone).
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"pd-serve not ready in {timeout_s:.0f}s:\n{self.log()}")

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def blamed(self, name: str, since: int) -> list[str]:
        """Log lines since byte ``since`` in which the proxy took ``name`` out of rotation
        because a request on it failed (not because its health check did)."""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        marker = f"{name} out of rotation: "
        return [
            line
            for line in lines
            if marker in line and "health check failed" not in line.split(marker, 1)[1]
        ]

    def terminate(self, timeout_s: float = 120) -> int | None:
        """SIGTERM (pd-serve drains and stops everything); SIGKILL all it started if stuck."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for inst in self.instances().values():
                inst.resume()  # a stopped instance cannot be drained
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for child in self._descendants():
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def instances(self) -> dict[str, VllmInstance]:
        """The vLLM servers running now, by instance name (absent while restarting).

        Ray's raylet is pd-serve's child and the actors' workers are its children, so
        every ``vllm serve`` of this cluster (a process-group leader; its stdout is the
        instance's log file) is among pd-serve's descendants."""
        found = {}
        for proc in self._descendants():
            try:
                cmdline = proc.cmdline()
                if "--kv-transfer-config" not in cmdline or os.getpgid(proc.pid) != proc.pid:
                    continue
                name = Path(os.readlink(f"/proc/{proc.pid}/fd/1")).stem
            except (psutil.Error, OSError):
                continue
            kv_config = json.loads(cmdline[cmdline.index("--kv-transfer-config") + 1])
            role = {"kv_producer": "prefill", "kv_consumer": "decode"}[kv_config["kv_role"]]
            host = cmdline[cmdline.index("--host") + 1]
            port = int(cmdline[cmdline.index("--port") + 1])
            self.ports_seen.add(port)
            found[name] = VllmInstance(name, role, proc.pid, f"http://{host}:{port}")
        return found

    def resume_all(self) -> None:
        for inst in self.instances().values():
            inst.resume()

    def proxy_connections(self) -> int:
        """TCP connections the pd-serve process holds to vLLM servers (any incarnation)
        or from clients to the proxy, open or half-closed (CLOSE_WAIT: the peer closed,
        the proxy never did)."""
        kept = {psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT}
        count = 0
        for conn in psutil.Process(self.proc.pid).net_connections(kind="tcp"):
            if conn.status not in kept:
                continue
            to_vllm = conn.raddr and conn.raddr.port in self.ports_seen
            from_client = conn.laddr and conn.laddr.port == self.port
            count += bool(to_vllm or from_client)
        return count

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    async def health(self, http: httpx.AsyncClient) -> dict[str, Any]:
        response = await http.get(f"{self.url}/health", timeout=5)
        return {"http_status": response.status_code, **response.json()}

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        return parse_prometheus((await http.get(f"{self.url}/metrics", timeout=10)).text)


# --- requests ------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # completed | error | lost | hung
    status: int | None
    elapsed_s: float
    detail: str = ""
    events: int = 0  # stream events received (a stream's progress)
    answer: Any = None  # a completed non-streamed answer, parsed


def completion_body(
    prompt_chars: int = 200,
    max_tokens: int = 16,
    stream: bool = False,
    chat: bool = False,
    salt: int | None = None,
) -> dict[str, Any]:
    """A request of a known answer length (ignore_eos): the tiny model's tokenizer is
    byte-level, so ``prompt_chars`` ASCII characters are that many prompt tokens."""
    salt = random.randrange(10**9) if salt is None else salt
    words = f"{salt} prefill decode cache transfer lease block "
    text = (words * (prompt_chars // len(words) + 1))[:prompt_chars]
    body: dict[str, Any] = {
        "model": SERVED,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def endpoint_of(body: dict[str, Any]) -> str:
    return "chat/completions" if "messages" in body else "completions"


async def send(
    http: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    deadline_s: float,
    on_event: Callable[[], None] | None = None,
) -> Outcome:
    """POST ``body`` and classify how it ended; abandon it after ``deadline_s``.

    ``on_event()`` is called as events arrive (in every read that completes one)."""
    started = time.monotonic()
    progress = {"events": 0}
    try:
        outcome = await asyncio.wait_for(
            _send(http, f"{base_url}/v1/{endpoint_of(body)}", body, progress, on_event),
            deadline_s,
        )
    except TimeoutError:
        return Outcome(
            "hung",
            None,
            time.monotonic() - started,
            f"no end within {deadline_s:.0f}s",
            progress["events"],
        )
    outcome.elapsed_s = time.monotonic() - started
    return outcome


async def _send(http, url, body, progress, on_event) -> Outcome:
    try:
        async with http.stream("POST", url, json=body) as response:
            raw = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    # Event ends in this chunk (one may straddle the previous chunk).
                    ended = raw.count(b"\n\n", max(0, len(raw) - len(chunk) - 1))
                    if ended:
                        progress["events"] += ended
                        if on_event is not None:
                            on_event()
            except httpx.HTTPError as e:
                return Outcome(
                    "lost",
                    response.status_code,
                    0,
                    f"connection broke after {len(raw)} bytes: {e!r}",
                    progress["events"],
                )
    except httpx.HTTPError as e:
        return Outcome("lost", None, 0, f"no answer: {e!r}")
    status = response.status_code
    if status != 200:
        if _openai_error(_json(bytes(raw))):
            return Outcome("error", status, 0, bytes(raw[:300]).decode(errors="replace"))
        return Outcome("lost", status, 0, f"error without an OpenAI body: {bytes(raw[:300])!r}")
    if body.get("stream"):
        return _classify_stream(bytes(raw), body["max_tokens"], progress["events"])
    answer = _json(bytes(raw))
    if not isinstance(answer, dict) or not answer.get("choices"):
        return Outcome("lost", status, 0, f"malformed answer: {bytes(raw[:300])!r}")
    tokens = (answer.get("usage") or {}).get("completion_tokens")
    if tokens != body["max_tokens"]:
        return Outcome("lost", status, 0, f"{tokens} tokens, asked for {body['max_tokens']}")
    return Outcome("completed", status, 0, answer=answer)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _openai_error(obj: Any) -> bool:
    error = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _classify_stream(raw: bytes, max_tokens: int, events: int) -> Outcome:
    def lost(why: str) -> Outcome:
        return Outcome("lost", 200, 0, why, events)

    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return lost("stream is not UTF-8")
    *blocks, tail = text.split("\n\n")
    if tail.strip():
        return lost(f"stream ends inside an event: {tail[-200:]!r}")
    payloads = []
    for block in blocks:
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines or not all(line.startswith("data: ") for line in lines):
            return lost(f"malformed event: {block[:200]!r}")
        payloads.append("\n".join(line[len("data: ") :] for line in lines))
    done = bool(payloads) and payloads[-1] == "[DONE]"
    if done:
        payloads.pop()
    parsed = []
    for payload in payloads:
        obj = _json(payload.encode())
        if not isinstance(obj, dict):
            return lost(f"event is not a JSON object: {payload[:200]!r}")
        parsed.append(obj)
    errors = [i for i, obj in enumerate(parsed) if _openai_error(obj)]
    if errors:
        if errors != [len(parsed) - 1]:
            return lost("an error event is not the stream's last event")
        return Outcome("error", 200, 0, json.dumps(parsed[-1])[:300], events)
    if not done:
        return lost(f"stream ends after {len(parsed)} events without [DONE] or an error")
    usage = next((o["usage"] for o in reversed(parsed) if o.get("usage")), None)
    if not usage or usage.get("completion_tokens") != max_tokens:
        return lost(f"stream usage {usage}, asked for {max_tokens} tokens")
    if not any(o.get("choices") for o in parsed):
        return lost("stream without choices")
    return Outcome("completed", 200, 0, events=events)


def http_client() -> httpx.AsyncClient:
    """Deadlines come from ``send``; the client itself never gives up."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)


# --- scenarios -----------------------------------------------------------------------------


class Abort(Exception):
    """A required step of the scenario failed; the rest of it cannot run."""


@dataclass
class ScenarioResult:
    name: str
    description: str = ""
    outcomes: list[Outcome] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    stranded_blocks: dict[str, int] = field(default_factory=dict)  # instance -> blocks
    connections: tuple[int, int] | None = None  # (baseline, after)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def stranded(self) -> int:
        return sum(max(0, b) for b in self.stranded_blocks.values())

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, bool(ok), detail))
        return bool(ok)

    def require(self, what: str, ok: bool, detail: str = "") -> None:
        if not self.check(what, ok, detail):
            raise Abort(what)

    def failures(self) -> list[str]:
        problems = [f"{what}: {detail}" for what, ok, detail in self.checks if not ok]
        for outcome in self.outcomes:
            if outcome.kind in ("lost", "hung"):
                problems.append(
                    f"request {outcome.kind} ({outcome.elapsed_s:.1f}s): {outcome.detail}"
                )
        return problems

    def summary(self) -> str:
        lines = [
            f"scenario {self.name}: sent {len(self.outcomes)}, "
            f"completed {self.count('completed')}, error {self.count('error')}, "
            f"lost {self.count('lost')}, hung {self.count('hung')}, "
            f"stranded {self.stranded_blocks}, connections {self.connections}"
        ]
        for what, ok, detail in self.checks:
            lines.append(
                f"  [{'ok' if ok else 'FAILED'}] {what}" + (f": {detail}" if detail else "")
            )
        for outcome in self.outcomes:
            if outcome.kind != "completed":
                lines.append(
                    f"  {outcome.kind} {outcome.status} {outcome.elapsed_s:.1f}s "
                    f"{outcome.detail[:200]}"
                )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


Scenario = Callable[[PdServe, httpx.AsyncClient, ScenarioResult], Awaitable[None]]


async def wait_until(
    what: str, probe: Callable[[], Awaitable[Any]], timeout_s: float, interval_s: float = 0.25
) -> tuple[bool, Any, float]:
    """Poll ``probe`` until it returns something truthy; (ok, last value, seconds)."""
    started = time.monotonic()
    value: Any = None
    while True:
        try:
            value = await probe()
        except (httpx.HTTPError, KeyError, ValueError) as e:
            value = e
        else:
            if value:
                return True, value, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return False, value, time.monotonic() - started
        await asyncio.sleep(interval_s)


async def role_count(serve: PdServe, http: httpx.AsyncClient, role: str) -> int:
    return (await serve.health(http))[role]


async def wait_role_count(
    serve: PdServe,
    http: httpx.AsyncClient,
    result: ScenarioResult,
    role: str,
    count: int,
    timeout_s: float,
    what: str,
) -> float:
    async def probe() -> bool:
        return await role_count(serve, http, role) == count

    ok, last, took = await wait_until(what, probe, timeout_s)
    result.require(what, ok, f"after {took:.1f}s (bound {timeout_s:.0f}s; last {last!r})")
    return took


async def healthy_gauge(serve: PdServe, http: httpx.AsyncClient, name: str) -> float:
    role = "prefill" if "prefill" in name else "decode"
    return (await serve.metrics(http))[f'pd_instance_healthy{{instance="{name}",role="{role}"}}']


async def wait_instance(serve: PdServe, name: str, timeout_s: float = REJOIN_S) -> VllmInstance:
    async def probe():
        return serve.instances().get(name)

    ok, inst, _ = await wait_until(f"{name} running", probe, timeout_s, interval_s=1)
    if not ok:
        raise Abort(f"{name} has no vLLM server after {timeout_s:.0f}s")
    return inst


async def prefill_busy(serve: PdServe, http: httpx.AsyncClient) -> bool:
    """Whether the proxy has a prefill leg in flight on pd-prefill-0."""
    metrics = await serve.metrics(http)
    return metrics['pd_instance_inflight_requests{instance="pd-prefill-0",role="prefill"}'] > 0


async def kv_transfers(serve: PdServe, http: httpx.AsyncClient) -> tuple[float, float]:
    """(decode instances' completed KV loads, proxy's prefill fallbacks), summed."""
    metrics = await serve.metrics(http)
    loads = sum(v for k, v in metrics.items() if k.startswith("pd_kv_transfers{"))
    return loads, metrics.get("pd_prefill_fallbacks_total", 0.0)


async def check_served_with_transfer(
    serve: PdServe, http: httpx.AsyncClient, result: ScenarioResult, what: str, n: int = 3
) -> None:
    """``n`` requests after the fault all complete, each with a KV load from prefill."""
    loads_before, fallbacks_before = await kv_transfers(serve, http)
    outcomes = [
        await send(
            http,
            serve.url,
            completion_body(300, 8, stream=i % 2 == 1),
            serve.request_s + PROXY_SLACK_S,
        )
        for i in range(n)
    ]
    result.outcomes += outcomes
    result.check(
        f"{what}: requests complete",
        all(o.kind == "completed" for o in outcomes),
        "; ".join(f"{o.kind} {o.status} {o.detail[:120]}" for o in outcomes),
    )
    loads_after, fallbacks_after = await kv_transfers(serve, http)
    result.check(
        f"{what}: KV moved from prefill to decode for each",
        loads_after - loads_before == n and fallbacks_after == fallbacks_before,
        f"KV loads +{loads_after - loads_before:g} for {n} requests, "
        f"prefill fallbacks +{fallbacks_after - fallbacks_before:g}",
    )


def check_not_blamed(serve: PdServe, r: ScenarioResult, name: str, since: int) -> None:
    """The instance that did nothing wrong stays in rotation."""
    lines = serve.blamed(name, since)
    r.check(
        f"{name}, which kept working, is not taken out of rotation for the fault",
        not lines,
        " | ".join(line[-200:] for line in lines[:3]),
    )


async def run_scenario(
    serve: PdServe, scenario: Scenario, baseline_connections: int, name: str | None = None
) -> ScenarioResult:
    """Run one scenario, then restore the cluster and check what the fault left behind."""
    result = ScenarioResult(name or scenario.__name__, " ".join((scenario.__doc__ or "").split()))
    started = time.monotonic()
    async with http_client() as http:
        try:
            await scenario(serve, http, result)
        except Abort:
            pass
        except Exception:
            result.check("scenario ran to its end", False, traceback.format_exc()[-2000:])
        finally:
            serve.resume_all()
        await _restore_and_audit(serve, http, result, baseline_connections)
    result.elapsed_s = time.monotonic() - started
    return result


async def _restore_and_audit(serve, http, result, baseline_connections) -> None:
    async def ready() -> bool:
        return (await serve.health(http))["status"] == "ok"  # both roles in rotation

    ok, last, took = await wait_until("cluster ready", ready, REJOIN_S, interval_s=1)
    if not result.check("cluster serving again afterwards", ok, f"{took:.0f}s, last {last!r}"):
        return
    # No KV blocks held anywhere once nothing runs: leases released or expired
    # (bounded by lease_timeout_s), requests finished or aborted.
    bound = float(serve.connector["lease_timeout_s"]) + SETTLE_S
    for name, inst in sorted(serve.instances().items()):

        async def drained(inst=inst) -> bool:
            return await inst.kv_blocks_used(http) == 0

        ok, _, took = await wait_until(f"{name} holds no KV", drained, bound, interval_s=0.5)
        blocks = await inst.kv_blocks_used(http) if not ok else 0
        result.stranded_blocks[name] = blocks
        result.check(
            f"no KV blocks stranded on {name}", ok, f"{blocks} blocks still held after {took:.0f}s"
        )
    # Idle keep-alive connections expire after 5 s; leaked ones never do.
    limit = baseline_connections + CONNECTION_TOLERANCE

    async def closed() -> bool:
        return serve.proxy_connections() <= limit

    ok, _, _ = await wait_until("connections closed", closed, SETTLE_S, interval_s=1)
    after = serve.proxy_connections()
    result.connections = (baseline_connections, after)
    result.check(
        "no leaked proxy connections",
        ok,
        f"{after} open, baseline {baseline_connections} (+{CONNECTION_TOLERANCE} allowed)",
    )


async def quiet_connections(serve: PdServe) -> int:
    """The proxy's connection count once idle keep-alive connections have expired."""
    await asyncio.sleep(8)
    return serve.proxy_connections()


async def warm_up(serve: PdServe) -> int:
    """Use every instance once (plain and streamed), then return the idle proxy's
    connection count: the baseline every scenario's audit compares with."""
    serve.instances()  # learn the instances' ports
    async with http_client() as http:
        for stream in (False, True):
            outcome = await send(http, serve.url, completion_body(stream=stream), 120)
            if outcome.kind != "completed":
                raise RuntimeError(f"warm-up request failed: {outcome}")
    return await quiet_connections(serve)


# Each scenario: the fault, the requests around it, what must hold. Deadlines are upper
# bounds ("never hangs"), not speed expectations.


async def prefill_stops_answering(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
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
        health = await serve.health(http)
        r.check(
            "the proxy reports itself degraded, still serving (200)",
            health["http_status"] == 200 and health["status"] == "degraded",
            repr(health),
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


async def stalled_transfer_peer(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
    """The KV transfer peer stalls. Driven on the cluster's own instances with vLLM's
    disaggregation protocol (as the proxy speaks it), so the stall falls exactly
    between the two legs: (1) prefill answered, then its vLLM is stopped (SIGSTOP)
    before decode pulls the KV; (2) the KV's address is a side channel that accepts
    connections and never answers (a peer stalled at first contact). Decode must
    answer in full, with the single-instance answer, within its transfer deadline."""
    instances = serve.instances()
    prefill, decode = instances["pd-prefill-0"], instances["pd-decode-0"]
    bound = float(serve.connector["transfer_timeout_s"]) + ENGINE_SLACK_S

    async def reference(body: dict[str, Any]) -> Outcome:
        # The greedy answer, computed by one instance on its own: decode's must match.
        outcome = await send(http, prefill.url, body, 60)
        r.require(
            "prefill answers a plain request",
            outcome.kind == "completed",
            f"{outcome.kind} {outcome.status} {outcome.detail}",
        )
        return outcome

    async def counters() -> dict[str, float]:
        m = await decode.metrics(http)
        return {
            "loads": m["vllm:pd_kv_transfers_total"],
            "failures": m["vllm:pd_kv_transfer_failures_total"],
            "handshake_failures": m["vllm:pd_kv_handshake_failures_total"],
            "recomputed": m['vllm:prompt_tokens_by_source_total{source="local_compute"}'],
        }

    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}

    async def decode_with(body: dict[str, Any], params: dict[str, Any], what: str) -> Outcome:
        outcome = await send(http, decode.url, {**body, "kv_transfer_params": params}, bound)
        r.outcomes.append(outcome)
        r.check(
            f"{what}: decode answers in full within transfer_timeout_s + {ENGINE_SLACK_S} s "
            f"({bound:.0f}s)",
            outcome.kind == "completed",
            f"{outcome.kind} {outcome.status} {outcome.elapsed_s:.1f}s {outcome.detail}",
        )
        return outcome

    def same_answer(what: str, outcome: Outcome, expected: Outcome) -> None:
        if outcome.kind == "completed":
            r.check(
                f"{what}: the answer equals the single-instance answer",
                token_ids(outcome) == token_ids(expected),
                f"{token_ids(outcome)} vs {token_ids(expected)}",
            )

    # (1) The real prefill instance, stopped between its answer and decode's pull.
    what = "prefill stopped after answering"
    body = {**completion_body(1000, 16), "return_token_ids": True}
    expected = await reference(body)
    leg = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    answer = (await http.post(f"{prefill.url}/v1/completions", json=leg, timeout=60)).json()
    params = answer.get("kv_transfer_params")
    r.require(
        "prefill returns kv_transfer_params",
        bool(params),
        str(answer)[:300]
        if not params
        else f"{len(params['remote_block_ids'])} blocks held for decode",
    )
    before = await counters()
    prefill.stop()
    try:
        outcome = await decode_with(body, params, what)
        after = await counters()
    finally:
        prefill.resume()
    same_answer(what, outcome, expected)
    d = delta(before, after)
    loaded = d["loads"] == 1 and d["failures"] == 0
    recomputed = d["failures"] == 1 and d["recomputed"] >= 1000
    r.check(f"{what}: decode loaded the KV or recomputed the prompt", loaded or recomputed, str(d))
    r.notes.append(
        f"{what}: answered in {outcome.elapsed_s:.1f}s; "
        + (
            "the KV load succeeded anyway (the transport reads the stopped process's memory "
            "without its help, as NIXL/UCX does on one host)"
            if loaded
            else "the load failed at its deadline and decode recomputed the prompt"
        )
    )

    # (2) A peer that accepts connections and never answers.
    what = "side channel never answers"
    body = {**completion_body(1000, 16), "return_token_ids": True}
    expected = await reference(body)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the kernel; nobody ever reads them
        port = silent.getsockname()[1]
        stalled = {
            **params,
            "remote_engine_id": f"stalled-{uuid.uuid4().hex[:8]}",
            "remote_request_id": f"stalled-{uuid.uuid4().hex[:8]}",
            "remote_port": port,
            "remote_ports": [port],
        }
        before = await counters()
        outcome = await decode_with(body, stalled, what)
        after = await counters()
    same_answer(what, outcome, expected)
    d = delta(before, after)
    r.check(
        f"{what}: the handshake failed and decode recomputed the prompt",
        d["failures"] == 1 and d["handshake_failures"] == 1 and d["recomputed"] >= 1000,
        str(d),
    )
    r.notes.append(
        f"{what}: answered in {outcome.elapsed_s:.1f}s (handshake deadline "
        f"{serve.connector['handshake_timeout_s']} s)"
    )
    await check_served_with_transfer(serve, http, r, "after the stalls")


def token_ids(outcome: Outcome) -> list[int]:
    return outcome.answer["choices"][0]["token_ids"]


async def decode_stops_answering(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
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


async def request_deadline(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
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


async def prefill_killed_in_flight(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
    """Prefill's vLLM crashes (SIGKILL) with requests in flight: each completes (decode
    prefills itself) or fails with a clear error within a deadline; the actor restarts
    and rejoins the rotation by itself, and requests use the KV transfer again."""
    before = serve.instances()["pd-prefill-0"]
    since = serve.log_size()
    deadline_s = serve.request_s + ENGINE_SLACK_S
    bodies = [completion_body(1800, 32, stream=i % 2 == 0, chat=i % 3 == 0) for i in range(12)]
    tasks = [asyncio.create_task(send(http, serve.url, b, deadline_s)) for b in bodies]

    busy, _, _ = await wait_until("prefill busy", partial(prefill_busy, serve, http), 10, 0.02)
    before.kill()
    left = asyncio.create_task(
        wait_role_count(serve, http, r, "prefill", 0, 15, "the crashed prefill leaves rotation")
    )
    r.check("requests were in their prefill leg at the crash", busy)
    outcomes = await asyncio.gather(*tasks)
    r.outcomes += outcomes
    r.check(
        f"in-flight requests complete or fail clearly within request_s + {ENGINE_SLACK_S} s",
        all(o.kind in ("completed", "error") for o in outcomes),
        ", ".join(f"{o.kind}/{o.status}/{o.elapsed_s:.1f}s" for o in outcomes),
    )
    errors = [o for o in outcomes if o.kind == "error"]
    check_not_blamed(serve, r, "pd-decode-0", since)
    r.notes.append(
        f"in flight: {len(outcomes) - len(errors)} completed, {len(errors)} "
        f"clear errors ({', '.join(sorted({str(o.status) for o in errors}))})"
    )
    await left
    took = await wait_role_count(
        serve, http, r, "prefill", 1, REJOIN_S, "the restarted prefill rejoins rotation by itself"
    )
    r.notes.append(f"rejoined {took:.0f}s after leaving")
    r.check(
        "its pd_instance_healthy gauge is 1 again",
        await healthy_gauge(serve, http, "pd-prefill-0") == 1,
    )
    after = await wait_instance(serve, "pd-prefill-0")
    r.check(
        "a new vLLM server serves it",
        after.pid != before.pid and after.url != before.url,
        f"{before.url} (pid {before.pid}) -> {after.url} (pid {after.pid})",
    )
    await check_served_with_transfer(serve, http, r, "after the restart")


async def decode_killed_mid_stream(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult):
    """Decode's vLLM crashes (SIGKILL) mid-stream: each stream ends with an error event
    (no hang); the actor restarts and rejoins, and requests succeed again."""
    before = serve.instances()["pd-decode-0"]
    since = serve.log_size()
    bound = 60
    # Decode is throttled before the streams are sent, so that none can finish before
    # the kill however late this client gets to it.
    throttle = Throttle(before)
    throttle.start()
    started = [asyncio.Event() for _ in range(4)]
    streams = [
        asyncio.create_task(
            send(
                http,
                serve.url,
                completion_body(300, 1500, stream=True, chat=i == 0),
                bound,
                started[i].set,
            )
        )
        for i in range(4)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        waiting = asyncio.create_task(send(http, serve.url, completion_body(200, 1000), bound))
        await asyncio.sleep(0.5)
        # Held stopped, then killed: no window in which decode runs unthrottled.
        r.notes.append(await throttle.end(leave_stopped=True))
        before.kill()
    finally:
        if throttle.running:  # the streams did not all start: leave decode running
            r.notes.append(await throttle.end())
    left = asyncio.create_task(
        wait_role_count(serve, http, r, "decode", 0, 15, "the crashed decode leaves rotation")
    )
    outcomes = await asyncio.gather(*streams)
    r.outcomes += outcomes
    r.check(
        f"every stream ends with an error event within {bound}s",
        all(o.kind == "error" for o in outcomes),
        ", ".join(f"{o.kind}/{o.elapsed_s:.1f}s/{o.events} events" for o in outcomes),
    )
    outcome = await waiting
    r.outcomes.append(outcome)
    r.check(
        "a waiting (non-streamed) request gets a clear error",
        outcome.kind == "error",
        f"{outcome.kind} {outcome.status} {outcome.detail}",
    )
    check_not_blamed(serve, r, "pd-prefill-0", since)
    await left
    during = await send(http, serve.url, completion_body(200, 8, stream=True), 30)
    r.outcomes.append(during)
    r.check(
        "a request while no decode is in rotation gets a clear error",
        during.kind == "error",
        f"{during.kind} {during.status} {during.detail[:200]}",
    )
    took = await wait_role_count(
        serve, http, r, "decode", 1, REJOIN_S, "the restarted decode rejoins rotation by itself"
    )
    r.notes.append(f"rejoined {took:.0f}s after leaving")
    after = await wait_instance(serve, "pd-decode-0")
    r.check(
        "a new vLLM server serves it",
        after.pid != before.pid and after.url != before.url,
        f"{before.url} (pid {before.pid}) -> {after.url} (pid {after.pid})",
    )
    await check_served_with_transfer(serve, http, r, "after the restart")


FAULT_SCENARIOS: list[Scenario] = [
    prefill_stops_answering,
    stalled_transfer_peer,
    decode_stops_answering,
    request_deadline,
    prefill_killed_in_flight,
    decode_killed_mid_stream,
]


# --- load ----------------------------------------------------------------------------------


@dataclass
class MemoryTrace:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MiB)

    def quarter_means(self) -> tuple[float, float]:
        values = [rss for _, rss in self.samples]
        quarter = max(1, len(values) // 4)
        return statistics.mean(values[:quarter]), statistics.mean(values[-quarter:])

    def peak(self) -> float:
        return max(rss for _, rss in self.samples)


def load_scenario(clients: int, duration_s: float, memory: MemoryTrace | None = None) -> Scenario:
    async def load(serve: PdServe, http: httpx.AsyncClient, r: ScenarioResult) -> None:
        stop_at = time.monotonic() + duration_s
        deadline_s = serve.request_s + 60
        rng = random.Random(6)

        async def client(index: int) -> None:
            while time.monotonic() < stop_at:
                body = completion_body(
                    rng.randrange(50, 1200), rng.randrange(8, 64), stream=True, chat=index % 2 == 1
                )
                r.outcomes.append(await send(http, serve.url, body, deadline_s))

        async def sample_memory() -> None:
            started = time.monotonic()
            while time.monotonic() < stop_at:
                if memory is not None:
                    memory.samples.append((time.monotonic() - started, serve.rss_mib()))
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(client(i) for i in range(clients)))
        await sampler
        r.check(
            "every request completes or gets a clear error",
            all(o.kind in ("completed", "error") for o in r.outcomes),
            f"{r.count('lost')} lost, {r.count('hung')} hung",
        )
        if memory is not None and len(memory.samples) >= 8:
            first, last = memory.quarter_means()
            r.check(
                "proxy memory flat: last quarter's mean RSS within 10% of the first's",
                last <= first * 1.10,
                f"{first:.0f} MiB -> {last:.0f} MiB",
            )

    load.__name__ = f"load_{clients}_clients_{duration_s:g}s"
    load.__doc__ = (
        f"{clients} concurrent streaming clients (completions and chat, prompts "
        f"of 50-1200 tokens, 8-64 output tokens) for {duration_s:g} s"
    )
    return load
