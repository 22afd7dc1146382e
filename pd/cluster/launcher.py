"""Start, watch and stop a P/D cluster on Ray.

``Cluster.start`` joins (or starts) Ray, starts the node's KV store on every node
when the config has a ``store:`` section (``pd.cluster.store_actor``), creates one
named actor per instance in the pd namespace with the resources the plan asks for,
and waits, bounded, until every instance is healthy, reporting progress. Any failure
tears everything down again and raises ``StartupError`` naming the instance with the
tail of its log.
``Cluster.shutdown`` stops every vLLM server and actor, then the KV stores, and the
local Ray cluster if this process started it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pd.cluster.actor import FAILED, READY, InstanceActor, InstanceInfo
from pd.cluster.placement import PlacementWatch
from pd.cluster.plan import ClusterPlan, InstancePlan
from pd.cluster.priority import local_ray_env, niceness_warning
from pd.cluster.store_actor import start_stores, stop_stores

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """An instance did not become healthy; the message names it and shows its log."""


@dataclass
class InstanceHandle:
    plan: InstancePlan
    actor: Any  # a ray.actor.ActorHandle (its remote methods are looked up at run time)


class Cluster:
    def __init__(self, plan: ClusterPlan, log_dir: Path | None = None) -> None:
        self.plan = plan
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pd-serve-"))
        self.handles: list[InstanceHandle] = []
        self._started_ray = False
        self._dashboard_url: str | None = None
        self._stores: list[Any] = []  # the nodes' KV store actors (pd.cluster.store_actor)

    # --- start ----------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] = print) -> None:
        try:
            self._init_ray(progress)
            self._start_stores(progress)
            self._create_actors()
            self._wait_healthy(progress)
        except BaseException:
            self.shutdown(grace_s=5)
            raise

    def _init_ray(self, progress: Callable[[str], None]) -> None:
        import ray

        ray_spec = self.plan.config.ray
        self._started_ray = ray_spec.address is None
        if self._started_ray:
            local_ray_env()
        progress(
            "ray: starting a local cluster"
            if self._started_ray
            else f"ray: joining the cluster at {ray_spec.address}"
        )
        context = ray.init(
            address=ray_spec.address,
            namespace=ray_spec.namespace,
            include_dashboard=True if self._started_ray else None,
            dashboard_host=ray_spec.dashboard_host,
            dashboard_port=ray_spec.dashboard_port,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        self._dashboard_url = context.dashboard_url

    def _start_stores(self, progress: Callable[[str], None]) -> None:
        """The node's KV store, one per node, before the instances that use it."""
        from ray.exceptions import GetTimeoutError, RayActorError

        config = self.plan.config
        if config.store is None:
            return
        try:
            self._stores = start_stores(
                config.store,
                config.ray.namespace,
                config.ray.max_restarts,
                config.timeouts.startup_s,
                progress,
            )
        except (GetTimeoutError, RayActorError) as e:
            raise StartupError(f"the KV store actor did not start: {e}") from e

    def _create_actors(self) -> None:
        import ray

        remote_cls = ray.remote(InstanceActor)
        ray_spec = self.plan.config.ray
        for inst in self.plan.instances:
            actor = remote_cls.options(
                name=inst.name,
                namespace=ray_spec.namespace,
                num_cpus=inst.num_cpus,
                num_gpus=inst.num_gpus,
                max_restarts=ray_spec.max_restarts,
                **actor_placement_options(inst),
                # Keep vLLM's own environment choices (CUDA_VISIBLE_DEVICES comes from Ray).
                runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
            ).remote(inst, str(self.log_dir))
            self.handles.append(InstanceHandle(inst, actor))

    def _wait_healthy(self, progress: Callable[[str], None]) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.plan.config.timeouts.startup_s
        started = time.monotonic()
        pending = {h.plan.name: h for h in self.handles}
        announced: set[str] = set()
        placement = PlacementWatch(self.plan, progress)
        if reason := placement.fail_fast():
            raise StartupError(reason)
        while pending:
            if time.monotonic() > deadline:
                name = next(iter(pending))
                raise StartupError(
                    f"{name} not healthy after {self.plan.config.timeouts.startup_s:.0f}s "
                    f"(waiting for Ray resources or a slow model load?)\n"
                    + self._tail(pending[name])
                )
            unanswered = []
            for name, handle in list(pending.items()):
                try:
                    info: InstanceInfo = ray.get(handle.actor.info.remote(), timeout=1)
                except GetTimeoutError:
                    unanswered.append(name)  # the actor is still being placed or constructed
                    continue
                except RayActorError as e:
                    raise StartupError(f"{name}: its actor died during start-up: {e}") from e
                if name not in announced:
                    progress(f"{name}: starting vLLM at {info.url} (log: {info.log_path})")
                    if warning := niceness_warning(name, handle.plan.niceness, info.niceness):
                        progress(f"warning: {warning}")
                    announced.add(name)
                if info.state == READY:
                    progress(f"{name}: ready after {time.monotonic() - started:.0f}s")
                    del pending[name]
                elif info.state == FAILED:
                    raise StartupError(
                        f"{name}: vLLM exited during start-up\n" + self._tail(handle)
                    )
            placement.report(unanswered)
            time.sleep(1)

    def _tail(self, handle: InstanceHandle) -> str:
        import ray

        try:
            tail = ray.get(handle.actor.log_tail.remote(30), timeout=10)
        except Exception as e:  # the actor itself is gone
            return f"(no log: {e})"
        return "--- last lines of its log ---\n" + tail

    # --- inspect ---------------------------------------------------------------------------

    def dashboard_url(self) -> str:
        url = self._dashboard_url  # as ray.init() reported it (ray.worker's is deprecated)
        return f"http://{url}" if url and not url.startswith("http") else str(url)

    @staticmethod
    def token_auth_enabled() -> bool:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"

    # --- stop ------------------------------------------------------------------------------

    def shutdown(self, grace_s: float = 30) -> None:
        """Stop every vLLM server and actor; stop Ray if we started it. Idempotent."""
        import ray

        if not ray.is_initialized():
            return
        stops = [h.actor.stop.remote(grace_s) for h in self.handles]
        if stops:
            try:
                ray.wait(stops, num_returns=len(stops), timeout=grace_s + 10)
            except Exception:  # a dead actor cannot be stopped; killing it below is enough
                logger.debug("stopping actors", exc_info=True)
        for handle in self.handles:
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:
                logger.debug("killing %s", handle.plan.name, exc_info=True)
        self.handles.clear()
        stop_stores(self._stores)  # after the instances: their last saves may still arrive
        self._stores.clear()
        # Stops the local cluster if we started it; otherwise only disconnects.
        ray.shutdown()


def actor_placement_options(inst: InstancePlan) -> dict[str, Any]:
    """Ray actor options that keep ``inst`` on the nodes its role's placement names."""
    options: dict[str, Any] = {}
    if inst.ray_resources:
        options["resources"] = dict(inst.ray_resources)
    if inst.node_labels:
        options["label_selector"] = dict(inst.node_labels)
    return options
