"""Undo an inherited CPU pinning for the store's own processes and threads.

vLLM's CPU worker pins each of its OpenMP threads to one core
(``VLLM_CPU_OMP_THREADS_BIND``), its main thread included. A thread that thread starts
(the connector's loader, copier and putter) and a process it spawns (the node's store
process, started on a worker's first store call) inherit that single core, where
they wait behind the engine's busiest thread while the other cores may be idle.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_CGROUP_CPUS = Path("/sys/fs/cgroup/cpuset.cpus.effective")


def node_cpus() -> set[int]:
    """The CPUs this process's cgroup may use (every online CPU without a cpuset)."""
    with contextlib.suppress(OSError, ValueError):
        cpus = _parse_list(_CGROUP_CPUS.read_text())
        if cpus:
            return cpus
    return set(range(os.cpu_count() or 1))


def allow_all_cpus() -> None:
    """Let the calling thread run on every CPU of ``node_cpus`` (Linux sets affinity
    per thread; threads started after inherit it). Does nothing where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, node_cpus())


def _parse_list(text: str) -> set[int]:
    """A kernel CPU list ("0-3,6") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
