"""Find the node's store process, or start it.

``ensure_server(config, wait_s)``: ping ``<socket_dir>/store.sock``; if nobody answers,
take ``<socket_dir>/spawn.lock`` (flock, non-blocking) and start ``pd.store.server``
detached: it forks and serves in the child (no descendant of the caller, whose
process tree vLLM's shutdown kills), in a session of its own (nor does a killed
process group reach it), stdin closed, stdout and stderr appended to
``<socket_dir>/store.log``. Under pd-serve (``PD_STORE_MANAGED``) the node's store
actor runs the server and the caller only waits for it: a server started here would
be a descendant of the instance's guardian, which ends all of them with the instance. The lock's
file descriptor is handed to the server, which closes it once it serves (or knows it
will not), so a racing caller that finds the lock taken waits for that server instead
of starting another: of any number of racers, one starts a server. ``wait_s`` bounds
how long a caller waits for it to answer (0: start it and return).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

import pd
from pd import envs
from pd.store import protocol
from pd.store.config import StoreConfig

logger = logging.getLogger(__name__)

SPAWN_LOCK = "spawn.lock"
LOG_FILE = "store.log"
_PING_INTERVAL_S = 0.05
_DETACH_WAIT_S = 30.0

_contexts: dict[int, zmq.Context[zmq.Socket[bytes]]] = {}
_contexts_lock = threading.Lock()


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """This process's ZMQ context for store sockets (a forked child makes its own)."""
    pid = os.getpid()
    with _contexts_lock:
        ctx = _contexts.get(pid)
        if ctx is None:
            ctx = _contexts[pid] = zmq.Context()
        return ctx


def ping(config: StoreConfig, timeout_ms: int | None = None) -> int | None:
    """The serving store's pid, or None when nobody answers within ``timeout_ms``."""
    timeout_ms = config.timeout_ms if timeout_ms is None else timeout_ms
    if not _listening(config.socket_path):
        return None
    sock = context().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(config.endpoint)
        request = protocol.encode_request(0, 0, protocol.Ping())  # pid 0: not a client
        deadline = time.monotonic() + timeout_ms / 1000
        while True:  # with IMMEDIATE, a send before the connection is up raises Again
            try:
                sock.send(request, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.005)
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        if not sock.poll(remaining_ms):
            return None
        _, reply = protocol.decode_reply(sock.recv())
        return reply.server_pid if isinstance(reply, protocol.Ok) else None
    except (zmq.ZMQError, protocol.ProtocolError):
        return None
    finally:
        sock.close(linger=0)


def _listening(path: str) -> bool:
    """Whether a process accepts connections on ``path`` (a killed server's stale socket
    file refuses at once, where ZMQ would retry until the ping's deadline)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def ensure_server(config: StoreConfig, wait_s: float) -> bool:
    """Whether a store serves ``config.socket_dir`` now, starting one if none does.

    Waits at most about ``wait_s`` (plus one ping) for a starting server to answer.
    Never raises: a store that cannot start is a store that misses.
    """
    try:
        if ping(config) is not None:
            return True
        if envs.PD_STORE_MANAGED():
            return _wait_for(config, wait_s)  # pd-serve's store actor runs it
        socket_dir = Path(str(config.socket_dir))
        socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(socket_dir / SPAWN_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        logger.warning("KV store at %s unavailable: %s", config.socket_dir, e)
        return False
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _wait_for(config, wait_s)  # another caller is starting one
        # Checked again under the lock: a server may have come up since the ping, or
        # live but be too busy to answer one.
        if ping(config) is not None:
            return True
        # A server too busy to answer may still hold the socket dir: the one started
        # here then sees its lock taken and exits at once.
        _start(config, lock_fd, socket_dir)
    except OSError as e:
        logger.warning("cannot start the KV store in %s: %s", config.socket_dir, e)
        return False
    finally:
        os.close(lock_fd)  # the server holds its own copy until it serves
    return _wait_for(config, wait_s)


def server_command(config: StoreConfig, owner_pid: int, *extra: str) -> list[str]:
    """``python -m pd.store.server`` for ``config``, kept alive by ``owner_pid``."""
    return [
        sys.executable,
        "-m",
        "pd.store.server",
        "--config",
        json.dumps(config.to_dict()),
        "--owner-pid",
        str(owner_pid),
        *extra,
    ]


def server_env() -> dict[str, str]:
    """This process's environment, with ``pd`` importable from any working directory
    (the server runs in its socket_dir)."""
    env = dict(os.environ)
    pd_root = str(Path(pd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pd_root, env.get("PYTHONPATH")) if p)
    return env


def _start(config: StoreConfig, lock_fd: int, socket_dir: Path) -> None:
    # --detach: the process started here forks and exits at once; its child serves and
    # is no descendant of this one (vLLM's shutdown kills its whole process tree).
    command = server_command(config, os.getpid(), "--spawn-lock-fd", str(lock_fd), "--detach")
    with open(socket_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=socket_dir,
            env=server_env(),
            pass_fds=(lock_fd,),
            start_new_session=True,
        )
    # It exits once it has forked (after its imports, well under a second): reap it.
    try:
        process.wait(timeout=_DETACH_WAIT_S)
    except subprocess.TimeoutExpired:
        threading.Thread(target=process.wait, name="store-reaper", daemon=True).start()
    logger.info("started the KV store process (log: %s)", socket_dir / LOG_FILE)


def _wait_for(config: StoreConfig, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if ping(config) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_PING_INTERVAL_S)
