"""The Ray actor behind each instance (``pd-prefill-0``, ``pd-decode-0``, ...).

It runs vLLM's own OpenAI server (``vllm serve``) with pd's connector in the
instance's role, and answers short questions about it. If that server crashes after
it was healthy, the actor exits so Ray restarts it (a new server on a new port); a
server that never became healthy is reported as failed instead, since restarting a
broken configuration would only fail again.

The server runs under a guardian (``pd.guardian``) that ends all of its processes when
the actor dies, however it dies, and holds a per-instance lock meanwhile: a restarted
actor's server starts only once every process of the previous incarnation has ended.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pd.cluster.network import instance_network_env
from pd.cluster.plan import InstancePlan
from pd.cluster.priority import set_niceness
from pd.vllm_server import VllmServer

logger = logging.getLogger(__name__)

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    role: str
    url: str
    state: str  # starting | ready | failed | stopped
    pid: int | None  # the vLLM API server's (its process group's id); None until launched
    actor_pid: int  # the Ray worker process running this actor
    incarnation: int  # 0 at first start, +1 per Ray restart
    log_path: str
    niceness: int  # the vLLM server's CPU priority (0 normal; Ray's workers default to 15)


def instance_lock_path(name: str) -> Path:
    """The lock every incarnation of instance ``name`` holds on this node: one per Ray
    cluster (session) and namespace, so other clusters on the machine never wait on it."""
    import ray

    context = ray.get_runtime_context()
    session_dir = Path(context.get_temp_dir()) / context.get_session_name()
    return session_dir / "pd-instances" / f"{context.namespace}.{name}.lock"


class InstanceActor:
    def __init__(self, plan: InstancePlan, log_dir: str) -> None:
        import ray

        from pd.models import make_model

        self._plan = plan
        context = ray.get_runtime_context()
        self._incarnation = int(getattr(context, "was_current_actor_reconstructed", False))
        host = plan.host or ray.util.get_node_ip_address()
        model = str(make_model(plan.model_preset)) if plan.model_preset else plan.model
        self._state = STARTING
        self._stopping = False
        self._niceness = set_niceness(plan.niceness)  # vLLM inherits it
        self._server = VllmServer(
            plan.name,
            model,
            host=host,
            args=plan.vllm_args,
            env={**plan.env, **instance_network_env(host, plan.env, plan.num_gpus)},
            log_path=Path(log_dir) / f"{plan.name}.log",
            lock_path=instance_lock_path(plan.name),
        ).start()
        threading.Thread(target=self._watch, name="pd-watch", daemon=True).start()

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            name=self._plan.name,
            role=self._plan.role,
            url=self._server.url,
            state=self._state,
            pid=self._server.pid,
            actor_pid=os.getpid(),
            incarnation=self._incarnation,
            log_path=str(self._server.log_path),
            niceness=self._niceness,
        )

    def log_tail(self, lines: int = 40) -> str:
        return self._server.log_tail(lines)

    def stop(self, grace_s: float = 30) -> None:
        self._stopping = True
        self._server.stop(grace_s)
        self._state = STOPPED

    def _watch(self) -> None:
        while not self._stopping:
            if not self._server.running():
                if self._stopping:
                    return
                if self._state == READY:
                    logger.error("%s: vLLM server exited; restarting the actor", self._plan.name)
                    os._exit(1)  # Ray restarts the actor, which starts a fresh server
                self._state = FAILED
                return
            if self._state == STARTING and self._server.healthy():
                self._state = READY
            time.sleep(0.5)
