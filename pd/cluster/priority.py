"""The CPU priority (niceness) of the vLLM instances.

Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``), and every
``vllm serve`` an instance actor starts would inherit it. Under CPU contention the
Linux scheduler then gives the engines a small share of what any niceness-0 process
gets: the proxy, Ray's daemons, a load generator, anything else on the host. pd
therefore sets each instance's niceness itself (``resources.niceness``, default 0):

- a cluster pd-serve starts itself gets ``RAY_worker_niceness=0`` (unless set), so no
  privilege is needed for the default;
- each actor sets its own niceness before starting vLLM, which inherits it. Raising
  niceness is always allowed; lowering it needs CAP_SYS_NICE (or RLIMIT_NICE).
  Without it the instance runs as Ray placed it, and pd-serve says so, with the fix.
"""

from __future__ import annotations

import contextlib
import os

RAY_WORKER_NICENESS = "RAY_worker_niceness"


def local_ray_env() -> None:
    """Before ``ray.init`` starts a local cluster: its workers at normal priority."""
    os.environ.setdefault(RAY_WORKER_NICENESS, "0")


def set_niceness(target: int) -> int:
    """Set this process's niceness to ``target`` where allowed (its children, the vLLM
    server among them, inherit it). Returns the niceness it runs at afterwards."""
    # Lowering niceness needs CAP_SYS_NICE; without it niceness_warning tells the user.
    if os.getpriority(os.PRIO_PROCESS, 0) != target:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, target)
    return os.getpriority(os.PRIO_PROCESS, 0)


def niceness_warning(name: str, wanted: int, actual: int) -> str | None:
    """What to tell the user about an instance not running at the niceness it asked for."""
    if actual == wanted:
        return None
    return (
        f"{name}: vLLM runs at niceness {actual}, not {wanted} (resources.niceness): this "
        f"process may not raise its priority. Under CPU contention its steps wait behind "
        f"every process of higher priority. Start the Ray cluster with "
        f"{RAY_WORKER_NICENESS}={wanted} in its environment, or give the Ray workers "
        f"CAP_SYS_NICE."
    )
