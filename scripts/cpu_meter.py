"""Where the machine's CPU time went during a benchmark run, by kind of process.

``CpuMeter`` reads every process's CPU time (user + system) when entered and when
left, and sums the difference by group: each vLLM process kind per core binding
(``VLLM_CPU_OMP_THREADS_BIND``: core 0 is prefill, core 1 decode, 0-1 colocated),
Ray, pd-serve, the load generator (children of this process that ended meanwhile)
and the rest. Used by scripts/bench_serving.py to explain the latencies it reports.
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict

import psutil

LOAD_GENERATOR = "load generator (vllm bench serve)"
HARNESS = "harness (incl. the stock P/D proxy)"


class CpuMeter:
    def __enter__(self) -> CpuMeter:
        self._before = _cpu_by_process()
        self._children = _children_cpu()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        after = _cpu_by_process()
        self.wall_s = time.monotonic() - self._started
        groups: dict[str, float] = defaultdict(float)
        for pid, (group, seconds) in after.items():
            before = self._before.get(pid)
            groups[group] += seconds - (before[1] if before and before[0] == group else 0.0)
        groups[LOAD_GENERATOR] += _children_cpu() - self._children
        self.seconds = {g: round(s, 2) for g, s in sorted(groups.items()) if s >= 0.05}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    seen = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            group = HARNESS if proc.pid == me else _group(proc)
            times = proc.cpu_times()
            seen[proc.pid] = (group, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return seen


def _group(proc: psutil.Process) -> str:
    name = proc.info["name"] or ""
    cmdline = " ".join(proc.info["cmdline"] or [])
    if "bench serve" in cmdline:
        return LOAD_GENERATOR
    if name.startswith("VLLM::") or "vllm serve" in cmdline:
        kind = {"VLLM::Worker": "worker", "VLLM::EngineCor": "engine core"}.get(name, "API server")
        return f"vLLM {kind} [cores {_binding(proc)}]"
    if name == "ray::InstanceActor":
        return "pd instance actors (Ray workers)"
    if name.startswith("ray") or name in ("raylet", "gcs_server") or "/ray/" in cmdline:
        return "Ray"
    if "pd-serve" in cmdline:
        return "pd-serve (proxy, launcher)"
    return "other"


def _binding(proc: psutil.Process) -> str:
    try:
        return proc.environ().get("VLLM_CPU_OMP_THREADS_BIND", "?")
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
        return "?"
