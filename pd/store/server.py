"""The node's store process: one ``TieredStore`` served to every instance on the node.

``python -m pd.store.server --config '<StoreConfig as JSON>'`` (``pd.store.spawn``
starts it, detached, on a client's first call). It

- takes ``<socket_dir>/server.lock`` (flock): a second server for the same directory
  exits at once, status 0, and the first keeps serving;
- opens the tiers (the disk tier takes its own flock on ``disk_path`` and rebuilds its
  index from the files there, so a restarted store serves what it stored before) and
  logs one line with their sizes and what was recovered;
- binds a ROUTER on ``ipc://<socket_dir>/store.sock`` and serves requests on a few
  threads (``TieredStore`` is thread-safe; disk reads and writes release the GIL);
- lives while any client process lives: every request carries its sender's pid, and
  the server exits once ``linger_s`` (30 s) passed with no request and none of the
  pids it has seen (nor ``--owner-pid``, e.g. pd-serve's store actor) is alive. A
  ``Ping`` carries pid 0 and keeps nothing alive. A client that comes later
  starts a new one, which finds the disk tier's entries again (the host tier's are
  gone with the process). SIGTERM or SIGINT stop it at once.

``--detach`` forks first and serves in the child, so the server is not a descendant
of the process that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import zmq

from pd.log import setup_logging
from pd.store import protocol
from pd.store.config import StoreConfig
from pd.store.disk import DiskTier, DiskTierInUse
from pd.store.host import HostTier
from pd.store.keys import BlockKey
from pd.store.stats import WarningLimiter
from pd.store.tiered import TieredStore

logger = logging.getLogger("pd.store.server")

DEFAULT_LINGER_S = 30.0
SERVER_LOCK = "server.lock"
PID_FILE = "store.pid"
_WORKERS = 4
_BACKEND = "inproc://pd-store-workers"
_POLL_MS = 200


def serve(
    config: StoreConfig,
    linger_s: float = DEFAULT_LINGER_S,
    owner_pid: int | None = None,
    spawn_lock_fd: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the store until it is idle with no live client (or ``stop`` is set).

    ``spawn_lock_fd`` is the spawner's lock (``pd.store.spawn``), inherited: closed
    once this process serves or knows it will not, so racing spawners wait for this
    one instead of starting another. Returns the exit status.
    """
    stop = stop or threading.Event()
    socket_dir = Path(str(config.socket_dir))
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        server_lock = _take_server_lock(socket_dir)
        if server_lock is None:
            logger.info("another store process serves %s; exiting", socket_dir)
            return 0
        store = TieredStore(
            HostTier(config.host_bytes) if config.host_gib > 0 else None,
            DiskTier(config.disk_path, config.disk_bytes) if config.disk_path else None,
        )
        try:
            store.open()
        except DiskTierInUse as e:
            logger.error("cannot open the disk tier: %s; exiting", e)
            return 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.socket_path)  # a dead server's; we hold the server lock
        server = _Server(store, config, linger_s, owner_pid, stop)
        (socket_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    finally:
        if spawn_lock_fd is not None:
            os.close(spawn_lock_fd)
    # store.open() logged the sizes and what the disk tier recovered.
    logger.info(
        "KV store process %d serving %s; exits %.0f s after its last client process",
        os.getpid(),
        config.endpoint,
        linger_s,
    )
    try:
        server.run()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.socket_path)
        with contextlib.suppress(FileNotFoundError):
            (socket_dir / PID_FILE).unlink()
        store.close()
        os.close(server_lock)
    return 0


class _Server:
    def __init__(
        self,
        store: TieredStore,
        config: StoreConfig,
        linger_s: float,
        owner_pid: int | None,
        stop: threading.Event,
    ) -> None:
        self.store = store
        self.linger_s = linger_s
        self.stop = stop
        self._lock = threading.Lock()
        self._last_request = time.monotonic()
        self._clients: set[int] = {owner_pid} if owner_pid else set()
        self._warnings = WarningLimiter(logger, {})
        self._context = zmq.Context()
        self._frontend = self._context.socket(zmq.ROUTER)
        self._frontend.setsockopt(zmq.LINGER, 0)
        self._frontend.bind(config.endpoint)
        self._backend = self._context.socket(zmq.DEALER)
        self._backend.setsockopt(zmq.LINGER, 0)
        self._backend.bind(_BACKEND)

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"store-worker-{i}", daemon=True)
            for i in range(_WORKERS)
        ]
        for worker in workers:
            worker.start()
        control = self._context.socket(zmq.PAIR)
        control.bind("inproc://pd-store-control")
        proxy = threading.Thread(target=self._proxy, name="store-proxy", daemon=True)
        proxy.start()
        try:
            while not self.stop.wait(1.0):
                if self._idle():
                    logger.info("no live client for %.0f s; exiting", self.linger_s)
                    break
        finally:
            self.stop.set()
            control.send(b"TERMINATE")
            proxy.join(timeout=5)
            for worker in workers:
                worker.join(timeout=5)
            control.close(linger=0)
            self._frontend.close(linger=0)
            self._backend.close(linger=0)
            self._context.term()

    def _proxy(self) -> None:
        control = self._context.socket(zmq.PAIR)
        control.connect("inproc://pd-store-control")
        try:
            zmq.proxy_steerable(self._frontend, self._backend, None, control)
        except zmq.ZMQError:
            pass
        finally:
            control.close(linger=0)

    def _idle(self) -> bool:
        with self._lock:
            if time.monotonic() - self._last_request < self.linger_s:
                return False
            self._clients = {pid for pid in self._clients if _alive(pid)}
            return not self._clients

    def _work(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(_BACKEND)
        try:
            while not self.stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart(copy=False)
                reply = self._handle(frames)
                if reply is not None:
                    sock.send_multipart(reply, copy=False)
        except zmq.ZMQError:
            if not self.stop.is_set():
                raise
        finally:
            sock.close(linger=0)

    def _handle(self, frames: Sequence[zmq.Frame]) -> list[bytes | memoryview] | None:
        if len(frames) < 2:
            return None  # not from a DEALER client: nothing to answer
        identity, header, payloads = frames[0].bytes, frames[1], frames[2:]
        request_id = 0
        try:
            request_id, pid, request = protocol.decode_request(header.buffer)
            with self._lock:
                self._last_request = time.monotonic()
                new_client = pid > 0 and pid not in self._clients
                if new_client:
                    self._clients.add(pid)
            if new_client:  # once per process: who shares this store (tests read it)
                logger.info("client process %d", pid)
            body, out = self._answer(request, payloads)
        except Exception as e:  # a bad request must not take the store down
            with self._lock:
                self._warnings.warn("bad_request", f"{type(e).__name__}: {e}")
            body, out = protocol.Error(f"{type(e).__name__}: {e}"), []
        return [identity, protocol.encode_reply(request_id, body), *out]

    def _answer(
        self, request: protocol.Request, payloads: Sequence[zmq.Frame]
    ) -> tuple[protocol.Reply, list[bytes | memoryview]]:
        store = self.store
        match request:
            case protocol.Lookup(namespace, hashes):
                hit = store.lookup_prefix(_keys(namespace, hashes))
                return protocol.LookupReply(hit.host_blocks, hit.disk_blocks), []
            case protocol.Get(namespace, hashes):
                found: list[bool] = []
                out: list[bytes | memoryview] = []
                for key in _keys(namespace, hashes):
                    data = store.get(key)
                    found.append(data is not None)
                    if data is not None:
                        out.append(data)
                return protocol.GetReply(found), out
            case protocol.Put(namespace, hashes):
                if len(payloads) != len(hashes):
                    raise protocol.ProtocolError(
                        f"put of {len(hashes)} blocks with {len(payloads)} payloads"
                    )
                keys = _keys(namespace, hashes)
                stored = sum(
                    store.put(key, frame.buffer) for key, frame in zip(keys, payloads, strict=True)
                )
                return protocol.PutReply(stored), []
            case protocol.Register(namespace):
                store.register_namespace(namespace)
                return protocol.Ok(os.getpid()), []
            case protocol.Stats():
                return protocol.StatsReply(store.stats()), []
            case protocol.Ping():
                return protocol.Ok(os.getpid()), []
        raise protocol.ProtocolError(f"unexpected request {type(request).__name__}")


def _keys(namespace: bytes, hashes: Sequence[bytes]) -> list[BlockKey]:
    return [BlockKey(namespace, h) for h in hashes]


def _take_server_lock(socket_dir: Path) -> int | None:
    fd = os.open(socket_dir / SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pd's node-shared KV store process")
    parser.add_argument("--config", required=True, help="StoreConfig as a JSON object")
    parser.add_argument("--linger-s", type=float, default=DEFAULT_LINGER_S)
    parser.add_argument("--owner-pid", type=int, default=None)
    parser.add_argument("--spawn-lock-fd", type=int, default=None)
    parser.add_argument(
        "--detach",
        action="store_true",
        help="fork: this process exits at once and the child serves, so the store is no "
        "descendant of whoever started it (vLLM's shutdown kills its process tree)",
    )
    args = parser.parse_args(argv)
    try:
        config = StoreConfig.from_dict(json.loads(args.config))
    except ValueError as e:  # json.JSONDecodeError is one too
        parser.exit(2, f"pd.store.server: bad --config: {e}\n")
    if args.detach and os.fork():
        os._exit(0)  # before any thread or ZMQ context exists; the child keeps the fds
    setup_logging()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d; exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return serve(config, args.linger_s, args.owner_pid, args.spawn_lock_fd, stop)


if __name__ == "__main__":
    raise SystemExit(main())
