"""Where the machine's CPU time went during a benchmark run, by kind of process.

``CpuMeter`` reads every process's CPU time (user + system) when entered and when
left, and sums the difference by group: each vLLM process kind per core binding
(``VLLM_CPU_OMP_THREADS_BIND``: core 0 is prefill, core 1 decode, 0-1 colocated),
Ray, pd-serve, the load generator (children of this process that ended meanwhile)
and the rest. It also sums, from ``/proc/<pid>/task/*/schedstat``, how long each
group's threads were runnable but waited for a core (the scheduler's run delay): a
decode step that waits there shows up in the client's inter-token latency. Used by
scripts/bench_serving.py to explain the latencies it reports.
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable

import psutil

LOAD_GENERATOR = "load generator (vllm bench serve)"
HARNESS = "harness (incl. the stock P/D proxy)"


class CpuMeter:
    def __enter__(self) -> CpuMeter:
        self._before = _snapshot()
        self._children = _children_cpu()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        after = _snapshot()
        self.wall_s = time.monotonic() - self._started
        cpu = _growth_by_group(self._before, after, _cpu_s)
        cpu[LOAD_GENERATOR] += _children_cpu() - self._children
        self.seconds = {g: round(s, 2) for g, s in sorted(cpu.items()) if s >= 0.05}
        waits = _growth_by_group(self._before, after, _waited_s)
        self.waited_s = {g: round(s, 3) for g, s in sorted(waits.items()) if s >= 0.001}


# A process's counters in a snapshot: (group, CPU seconds, run-queue seconds or None).
Sample = tuple[str, float, float | None]
Counter = Callable[[Sample], float | None]


def _cpu_s(sample: Sample) -> float | None:
    return sample[1]


def _waited_s(sample: Sample) -> float | None:
    return sample[2]


def _growth_by_group(
    before: dict[int, Sample], after: dict[int, Sample], counter: Counter
) -> defaultdict[str, float]:
    """How much ``counter`` grew per group between two snapshots (a pid seen in another
    group before, i.e. reused, or unreadable before, counts from zero)."""
    groups: defaultdict[str, float] = defaultdict(float)
    for pid, sample in after.items():
        if (value := counter(sample)) is None:
            continue
        earlier = before.get(pid)
        same = earlier is not None and earlier[0] == sample[0]
        earlier_value = counter(earlier) if earlier is not None and same else None
        groups[sample[0]] += value - (earlier_value or 0.0)
    return groups


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _snapshot() -> dict[int, Sample]:
    """Every live process: its group, CPU time (user + system) and the time its live
    threads spent runnable but not running (None if they could not all be read)."""
    seen = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            group = HARNESS if proc.pid == me else _group(proc)
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        seen[proc.pid] = (group, times.user + times.system, _run_delay_s(proc.pid))
    return seen


def _run_delay_s(pid: int) -> float | None:
    waited_ns = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/schedstat") as f:
                waited_ns += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None  # the process or one of its threads ended meanwhile
    return waited_ns / 1e9


def _group(proc: psutil.Process) -> str:
    name = proc.info["name"] or ""
    cmdline = " ".join(proc.info["cmdline"] or [])
    if "bench serve" in cmdline:
        return LOAD_GENERATOR
    if name.startswith("VLLM::") or "vllm serve" in cmdline:
        kind = next((k for prefix, k in _VLLM_KINDS if name.startswith(prefix)), "API server")
        return f"vLLM {kind} [cores {_binding(proc)}]"
    if name == "ray::InstanceActor":
        return "pd instance actors (Ray workers)"
    if name.startswith("ray") or name in ("raylet", "gcs_server") or "/ray/" in cmdline:
        return "Ray"
    if "pd-serve" in cmdline:
        return "pd-serve (proxy, launcher)"
    return "other"


_VLLM_KINDS = (("VLLM::Worker", "worker"), ("VLLM::EngineCor", "engine core"))


def _binding(proc: psutil.Process) -> str:
    """The core binding of the ``vllm serve`` a process belongs to (vLLM's own children
    do not always inherit the variable, so ask the ancestors too)."""
    try:
        for ancestor in [proc, *proc.parents()]:
            binding = ancestor.environ().get("VLLM_CPU_OMP_THREADS_BIND")
            if binding is not None:
                return binding
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
        pass
    return "?"
