"""Will the plan's actors be placed, and if not yet, why: asked of the machine or of Ray.

``check_before_start`` runs before anything starts (a local cluster: this machine),
``dry_run_problems`` for ``pd-serve --dry-run`` (a joined cluster: its nodes), and
``PlacementWatch`` inside the launcher's wait, which says within seconds which
instance waits for which resources and what the cluster has.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from pd.cluster import kv_size
from pd.cluster.config import ConfigError
from pd.cluster.plan import ClusterPlan
from pd.cluster.resources import Node, demand, fit_problems, fmt, local_node

logger = logging.getLogger(__name__)


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_before_start(plan: ClusterPlan) -> None:
    """A local cluster's instances must fit this machine: raise ``ConfigError`` naming
    what does not. (A joined cluster is checked once connected, by the launcher.)"""
    if plan.config.ray.address is not None:
        return
    kv_size.check_memory(plan.config, machine_memory_bytes())
    problems = fit_problems(plan.instances, [local_node(len(os.sched_getaffinity(0)))])
    if problems:
        raise ConfigError(_with_hint(problems))


def dry_run_problems(plan: ClusterPlan) -> list[str]:
    """What does not fit the cluster pd-serve would use (connecting to a joined one)."""
    if plan.config.ray.address is None:
        try:
            check_before_start(plan)
        except ConfigError as e:
            return [str(e)]
        return []
    import ray

    address = plan.config.ray.address
    _check_listening(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # unreachable, wrong address, auth: all one answer
        raise ConfigError(f"ray.address: cannot reach the Ray cluster at {address}: {e}") from e
    try:
        problems = fit_problems(plan.instances, ray_nodes())
    finally:
        ray.shutdown()
    return [_with_hint(problems)] if problems else []


def _check_listening(address: str) -> None:
    """A ``host:port`` nobody listens at is an error now: Ray would retry for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # auto, or a ray:// client address: Ray answers those quickly itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"ray.address: nothing answers at {address} ({e})") from None


def ray_nodes() -> list[Node]:
    """The connected cluster's live nodes and their total resources."""
    import ray

    return [
        Node(
            str(n.get("NodeManagerAddress") or n["NodeID"][:8]),
            dict(n["Resources"]),
            labels=dict(n.get("Labels") or {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _with_hint(problems: list[str]) -> str:
    return (
        "; ".join(problems)
        + " (lower prefill/decode.resources.cpus or gpus, use cpus: auto, or fewer instances)"
    )


class PlacementWatch:
    """Inside the launcher's wait: whether the actors can be placed, and which wait."""

    def __init__(
        self,
        plan: ClusterPlan,
        progress: Callable[[str], None],
        report_after_s: float = 5,
        repeat_s: float = 30,
    ) -> None:
        self._plan = plan
        self._progress = progress
        self._report_after_s = report_after_s
        self._repeat_s = repeat_s
        self._started = time.monotonic()
        self._next_report = self._started + report_after_s

    def problems(self) -> list[str]:
        """What cannot fit the cluster's total resources, as lines naming the instance."""
        return fit_problems(self._plan.instances, ray_nodes())

    def fail_fast(self) -> str | None:
        """The reason to give up now, or None. A local cluster cannot grow: its problems
        are final. A joined one may scale up or free resources: say so and keep waiting."""
        problems = self.problems()
        if not problems:
            return None
        if self._plan.config.ray.address is None:
            return "the instances do not fit the local Ray cluster: " + _with_hint(problems)
        for line in problems:
            self._progress(
                f"{line}: waiting in case the cluster grows or frees resources "
                f"(up to timeouts.startup_s={self._plan.config.timeouts.startup_s:g}s)"
            )
        return None

    def report(self, unanswered: list[str]) -> None:
        """Every ``repeat_s`` from ``report_after_s`` on: one line per instance whose actor
        Ray has not placed yet, with what it needs and what the cluster has free."""
        now = time.monotonic()
        if not unanswered or now < self._next_report:
            return
        self._next_report = now + self._repeat_s
        waited = now - self._started
        unplaced = _unplaced_actors(self._plan.config.ray.namespace, unanswered)
        free, total = _cluster_free_and_total()
        by_name = {i.name: i for i in self._plan.instances}
        for name in unanswered:
            if unplaced is not None and name not in unplaced:
                continue  # placed: its actor is starting (slow worker start or model build)
            state = "waiting for Ray resources" if unplaced is not None else "not started yet"
            self._progress(
                f"{name}: {state} after {waited:.0f}s: needs {fmt(demand(by_name[name]))}; "
                f"the cluster has {fmt(free)} free of {fmt(total)}"
            )


def _cluster_free_and_total() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    total = ray.cluster_resources()
    free = ray.available_resources()
    kinds = [k for k in ("CPU", "GPU") if total.get(k, 0) > 0] or ["CPU"]
    return {k: free.get(k, 0.0) for k in kinds}, {k: total.get(k, 0.0) for k in kinds}


def _unplaced_actors(namespace: str, names: list[str]) -> set[str] | None:
    """Those of ``names`` whose actor waits for a node (no worker process yet); None
    where Ray's state API cannot answer (a cluster without its dashboard)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("ray_namespace", "=", namespace)], detail=True, timeout=5)
    except Exception:
        logger.debug("ray state API unavailable", exc_info=True)
        return None
    wanted = set(names)
    return {
        a.name for a in actors if a.name in wanted and a.state == "PENDING_CREATION" and not a.pid
    }
