"""Which CPUs pd's own processes and threads run on.

vLLM's CPU worker pins each of its OpenMP threads to one core
(``VLLM_CPU_OMP_THREADS_BIND``), its main thread included. A thread that thread starts
(the connector's loader, copier and putter) and a process it spawns (the node's store
process, started on a worker's first store call) inherit that single core, where
they wait behind the engine's busiest thread while the other cores may be idle: they
move to the node's light CPUs instead.

The light CPUs are every CPU of the node's cgroup, unless pd-serve was given
``control_cores``: then it pins itself to them before it starts Ray, so the proxy,
Ray's daemons, the instance actors and each vLLM server's API and engine-core
processes inherit them, and names them in ``PD_CONTROL_CORES`` for the threads above.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CONTROL_CORES_ENV = "PD_CONTROL_CORES"
_CGROUP_CPUS = Path("/sys/fs/cgroup/cpuset.cpus.effective")


def node_cpus() -> set[int]:
    """The CPUs this process's cgroup may use (every online CPU without a cpuset)."""
    with contextlib.suppress(OSError, ValueError):
        cpus = parse_cpu_list(_CGROUP_CPUS.read_text())
        if cpus:
            return cpus
    return set(range(os.cpu_count() or 1))


def light_cpus() -> set[int]:
    """Where pd's light work may run: the cluster's control cores, else the node's CPUs."""
    with contextlib.suppress(ValueError):
        cpus = parse_cpu_list(os.environ.get(CONTROL_CORES_ENV, "")) & node_cpus()
        if cpus:
            return cpus
    return node_cpus()


def move_to_light_cpus() -> None:
    """Let the calling thread run on ``light_cpus`` (Linux sets affinity per thread;
    threads and processes started after inherit it). Does nothing where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, light_cpus())


def pin_control_processes(cores: set[int]) -> None:
    """pd-serve, before it starts Ray: it and every process it starts run on ``cores``
    (vLLM's workers then bind their own ``cpu_cores``)."""
    os.sched_setaffinity(0, cores)
    os.environ[CONTROL_CORES_ENV] = format_cpu_list(cores)


def parse_cpu_list(text: str) -> set[int]:
    """A kernel CPU list ("0-3,6") as a set; ``ValueError`` names what is malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"{part!r} is not a core number or range like 0-3") from None
        if low < 0 or high < low:
            raise ValueError(f"{part!r} is not a range of cores (low-high, from 0)")
        cpus.update(range(low, high + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)
