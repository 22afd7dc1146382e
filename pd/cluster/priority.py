"""The CPU priority of the vLLM instances.

Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``), and every
``vllm serve`` an instance actor starts inherits it. Under CPU contention the Linux
scheduler then gives the engines a small fraction of the CPU any niceness-0 process
gets: the proxy, Ray's daemons, a load generator, anything else on the host. On the
2-core bench machine the decode worker waited for a core a quarter of the time and
pd's inter-token tails doubled. pd therefore runs its engines at normal priority:

- a cluster pd-serve starts itself gets ``RAY_worker_niceness=0`` (unless set);
- an actor on a cluster started elsewhere lowers its own niceness before starting
  vLLM, which needs CAP_SYS_NICE (or RLIMIT_NICE); without it the instance runs as Ray
  placed it and pd-serve says so, with the fix.
"""

from __future__ import annotations

import os

RAY_WORKER_NICENESS = "RAY_worker_niceness"
ENGINE_NICENESS = 0


def local_ray_env() -> None:
    """Before ``ray.init`` starts a local cluster: its workers at normal priority."""
    os.environ.setdefault(RAY_WORKER_NICENESS, str(ENGINE_NICENESS))


def raise_to_engine_priority() -> int:
    """Lower this process's niceness to ENGINE_NICENESS if allowed (its children, the
    vLLM server among them, inherit it). Returns the niceness it runs at afterwards."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current > ENGINE_NICENESS:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, ENGINE_NICENESS)
        except PermissionError:
            return current
    return os.getpriority(os.PRIO_PROCESS, 0)


def niceness_warning(name: str, niceness: int) -> str | None:
    """What to tell the user about an instance running below normal priority."""
    if niceness <= ENGINE_NICENESS:
        return None
    return (
        f"{name}: vLLM runs at niceness {niceness} (Ray's worker default) and pd may not "
        f"raise it; under CPU contention its steps wait behind every normal-priority "
        f"process. Start the Ray cluster with {RAY_WORKER_NICENESS}={ENGINE_NICENESS} in "
        f"its environment, or give the Ray workers CAP_SYS_NICE."
    )
