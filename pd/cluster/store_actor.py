"""The node's KV store under pd-serve: one Ray actor per node, ``pd-store-<node>``.

With a ``store:`` section, pd-serve starts these before any instance: each runs
``pd.store.server`` for the store settings on its node (node affinity, no CPUs
reserved), as its own child in a session of its own, so the server is no instance's
descendant (an instance's guardian ends all of those with it) and outlives every
instance restart. The actor's pid is the server's ``--owner-pid``: the server's
linger rule keeps it while the actor lives. The instances find it by ping (pd-serve
sets ``PD_STORE_MANAGED`` for them, so they never start one themselves). A server
that exits is started again (its disk tier's entries come back; its host tier's are
lost); ``stop`` ends it, after the instances, when pd-serve shuts down.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pd.store import spawn
from pd.store.config import StoreConfig

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 1.0
_STOP_GRACE_S = 10.0
_START_WAIT_S = 30.0  # a store that is not up by then is reported; instances miss meanwhile


@dataclass(frozen=True)
class StoreInfo:
    name: str
    node_ip: str
    socket_dir: str
    log_path: str
    server_pid: int | None  # the serving process (whoever started it); None while down
    actor_pid: int  # the Ray worker running this actor: the server's owner
    starts: int  # server processes this actor started


def store_actor_name(node_id: str) -> str:
    return f"pd-store-{node_id[:8]}"


class StoreActor:
    def __init__(self, name: str, store: dict[str, Any]) -> None:
        import ray

        self._name = name
        self._node_ip = ray.util.get_node_ip_address()
        self._config = StoreConfig.from_dict(store)
        self._socket_dir = Path(str(self._config.socket_dir))
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._ensure_serving()
        threading.Thread(target=self._watch, name="pd-store-watch", daemon=True).start()

    def wait_serving(self, timeout_s: float = _START_WAIT_S) -> StoreInfo:
        """Its info once the store answers, or after ``timeout_s`` (``server_pid`` None)."""
        deadline = time.monotonic() + timeout_s
        while spawn.ping(self._config) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.info()

    def info(self) -> StoreInfo:
        return StoreInfo(
            name=self._name,
            node_ip=self._node_ip,
            socket_dir=str(self._socket_dir),
            log_path=str(self._socket_dir / spawn.LOG_FILE),
            server_pid=spawn.ping(self._config),
            actor_pid=os.getpid(),
            starts=self._starts,
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self._socket_dir / spawn.LOG_FILE).read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """End the server this actor started (SIGTERM, SIGKILL after ``grace_s``)."""
        with self._lock:
            self._stopping = True
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _ensure_serving(self) -> None:
        with self._lock:
            if self._stopping or (self._process is not None and self._process.poll() is None):
                return
            if spawn.ping(self._config) is not None:
                return  # a server from before (a restarted actor's) still serves: keep it
            self._socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self._socket_dir / spawn.LOG_FILE, "ab") as log:
                self._process = subprocess.Popen(
                    spawn.server_command(self._config, os.getpid()),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._socket_dir,
                    env=spawn.server_env(),
                    # A Ctrl-C to pd-serve's process group is not for it: pd-serve
                    # stops it after the instances.
                    start_new_session=True,
                )
            self._starts += 1
            logger.info(
                "%s: KV store process %d for %s", self._name, self._process.pid, self._socket_dir
            )

    def _watch(self) -> None:
        while not self._stopping:
            time.sleep(_WATCH_INTERVAL_S)
            with self._lock:
                process = self._process
                if self._stopping or process is None or process.poll() is None:
                    continue
                self._process = None
            logger.warning(
                "%s: KV store process %d exited %s; starting another",
                self._name,
                process.pid,
                process.returncode,
            )
            self._ensure_serving()


def start_stores(
    store: dict[str, Any],
    namespace: str,
    max_restarts: int,
    timeout_s: float,
    progress: Callable[[str], None],
) -> list[Any]:
    """One ``StoreActor`` on every alive Ray node that can host an instance, each
    serving before this returns (or reported as not serving); their handles."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_cls = ray.remote(StoreActor)
    actors: list[Any] = []  # ActorHandles (their remote methods are looked up at run time)
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if not node.get("Alive") or not (resources.get("CPU", 0) or resources.get("GPU", 0)):
            continue
        name = store_actor_name(node["NodeID"])
        actors.append(
            remote_cls.options(
                name=name,
                namespace=namespace,
                num_cpus=0,
                max_restarts=max_restarts,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
            ).remote(name, store)
        )
    for actor in actors:
        info: StoreInfo = ray.get(actor.wait_serving.remote(), timeout=timeout_s)
        if info.server_pid is None:
            tail = ray.get(actor.log_tail.remote(), timeout=10)
            progress(
                f"warning: {info.name}: the KV store on {info.node_ip} does not answer; its "
                f"instances miss until it does (log: {info.log_path})\n{tail}"
            )
        else:
            progress(
                f"{info.name}: KV store on {info.node_ip} serving {info.socket_dir} "
                f"(pid {info.server_pid}, log: {info.log_path})"
            )
    return actors


def stop_stores(actors: list[Any], grace_s: float = _STOP_GRACE_S) -> None:
    """End every store actor's server, then the actors. Never raises."""
    import ray

    if actors:
        try:
            ray.wait(
                [a.stop.remote(grace_s) for a in actors],
                num_returns=len(actors),
                timeout=grace_s + 10,
            )
        except Exception:  # a dead actor's server ended with it or ends by its linger rule
            logger.debug("stopping the store actors", exc_info=True)
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            logger.debug("killing a store actor", exc_info=True)
