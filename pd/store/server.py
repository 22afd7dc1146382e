"""The node's store process: one ``TieredStore`` served to every instance on the node.

``python -m pd.store.server --config '<StoreConfig as JSON>'`` (``pd.store.spawn``
starts it, detached, on a client's first call). It

- takes ``<socket_dir>/server.lock`` (flock): a second server for the same directory
  exits at once, status 0, and the first keeps serving;
- opens the tiers (the disk tier takes its own flock on ``disk_path`` and rebuilds its
  index from the files there, so a restarted store serves what it stored before) and
  logs one line with their sizes and what was recovered;
- binds a ROUTER on ``ipc://<socket_dir>/store.sock``; one thread answers lookups,
  pings, registrations and stats itself and queues gets and puts for a few worker
  threads (``TieredStore`` is thread-safe; disk reads and writes release the GIL); a
  lookup that finds blocks on disk only also queues their readahead into the page
  cache, so the load that follows it reads memory;
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
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import zmq

from pd.log import setup_logging
from pd.store import protocol
from pd.store.affinity import allow_all_cpus
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
_MAX_QUEUED = 64  # gets and puts waiting for a worker; more are refused (a miss)
_REPLIES = "inproc://pd-store-replies"
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
    """One dispatcher thread owns the ROUTER: it answers the small requests (lookup,
    ping, register, stats) itself and queues gets and puts for the workers, whose
    replies come back to it over an inproc PULL socket. So a lookup never waits
    behind a put (with a plain ROUTER/DEALER proxy it could be dealt to a worker busy
    with one: 865 ms worst seen, docs/store.md "Save path")."""

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
        self._jobs: queue.Queue[_Job | _Readahead | None] = queue.Queue(_MAX_QUEUED)
        self._context = zmq.Context()
        self._frontend = self._context.socket(zmq.ROUTER)
        self._frontend.setsockopt(zmq.LINGER, 0)
        self._frontend.bind(config.endpoint)
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(_REPLIES)

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"store-worker-{i}", daemon=True)
            for i in range(_WORKERS)
        ]
        for worker in workers:
            worker.start()
        dispatcher = threading.Thread(target=self._dispatch, name="store-dispatch", daemon=True)
        dispatcher.start()
        try:
            while not self.stop.wait(1.0):
                if self._idle():
                    logger.info("no live client for %.0f s; exiting", self.linger_s)
                    break
        finally:
            self.stop.set()
            dispatcher.join(timeout=5)
            for _ in workers:
                with contextlib.suppress(queue.Full):
                    self._jobs.put_nowait(None)
            for worker in workers:
                worker.join(timeout=5)
            self._frontend.close(linger=0)
            self._replies.close(linger=0)
            self._context.term()

    def _dispatch(self) -> None:
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if self._replies in ready:  # workers' answers first: they free memory
                    while True:
                        try:
                            reply = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._frontend.send_multipart(reply, copy=False)
                if self._frontend in ready:
                    while True:
                        try:
                            frames = self._frontend.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._route(frames)
        except zmq.ZMQError:
            if not self.stop.is_set():
                raise

    def _route(self, frames: Sequence[zmq.Frame]) -> None:
        """Answer a small request here; queue a get or put (a full queue is refused)."""
        job = self._parse(frames)
        if job is None:
            return
        if isinstance(job.request, protocol.Get | protocol.Put):
            try:
                self._jobs.put_nowait(job)
                return
            except queue.Full:
                with self._lock:
                    self._warnings.warn("busy", f"{_MAX_QUEUED} gets/puts queued; refused one")
                reply = self._error(job, "store busy: too many gets and puts queued")
        elif isinstance(job.request, protocol.Lookup):
            reply, on_disk_only = self._lookup(job, job.request)
            self._frontend.send_multipart(reply, copy=False)
            if on_disk_only:  # after the reply: the scheduler waits for it, not for this
                self._queue_readahead(on_disk_only)
            return
        else:
            reply = self._handle(job)
        self._frontend.send_multipart(reply, copy=False)

    def _lookup(
        self, job: _Job, lookup: protocol.Lookup
    ) -> tuple[list[bytes | memoryview], list[BlockKey]]:
        """The reply to a lookup, and its hit's keys when some are on disk only."""
        keys = _keys(lookup.namespace, lookup.block_hashes)
        try:
            hit = self.store.lookup_prefix(keys)
        except Exception as e:  # a bad request must not take the store down
            return self._error(job, f"{type(e).__name__}: {e}"), []
        body = protocol.LookupReply(hit.host_blocks, hit.disk_blocks)
        reply: list[bytes | memoryview] = [
            job.identity,
            protocol.encode_reply(job.request_id, body),
        ]
        return reply, keys[: hit.num_blocks] if hit.disk_blocks else []

    def _queue_readahead(self, keys: list[BlockKey]) -> None:
        """Have a worker hint a lookup's hit into the page cache while the engine
        schedules its load (a hint: dropped when the workers are busy)."""
        if self._jobs.qsize() >= _MAX_QUEUED // 2:
            return  # never take the room of gets and puts
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(_Readahead(keys))

    def _idle(self) -> bool:
        with self._lock:
            if time.monotonic() - self._last_request < self.linger_s:
                return False
            self._clients = {pid for pid in self._clients if _alive(pid)}
            return not self._clients

    def _work(self) -> None:
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(_REPLIES)
        try:
            while not self.stop.is_set():
                try:  # bounded: at exit the queue may be too full for the None
                    job = self._jobs.get(timeout=_POLL_MS / 1000)
                except queue.Empty:
                    continue
                if job is None:
                    break
                if isinstance(job, _Readahead):
                    try:
                        self.store.readahead(job.keys)
                    except Exception as e:  # a hint: never the worker's end
                        with self._lock:
                            self._warnings.warn("readahead", f"readahead failed: {e!r}")
                    continue
                reply = self._handle(job)
                if not self.stop.is_set():
                    sock.send_multipart(reply, copy=False)
        except zmq.ZMQError:
            if not self.stop.is_set():
                raise
        finally:
            sock.close(linger=0)

    def _parse(self, frames: Sequence[zmq.Frame]) -> _Job | None:
        if len(frames) < 2:
            return None  # not from a DEALER client: nothing to answer
        identity, header, payloads = frames[0].bytes, frames[1], frames[2:]
        try:
            request_id, pid, request = protocol.decode_request(header.buffer)
        except Exception as e:  # a bad request must not take the store down
            return _Job(identity, 0, e, payloads)
        with self._lock:
            self._last_request = time.monotonic()
            new_client = pid > 0 and pid not in self._clients
            if new_client:
                self._clients.add(pid)
        if new_client:  # once per process: who shares this store (tests read it)
            logger.info("client process %d", pid)
        return _Job(identity, request_id, request, payloads)

    def _handle(self, job: _Job) -> list[bytes | memoryview]:
        try:
            if isinstance(job.request, Exception):
                raise job.request
            body, out = self._answer(job.request, job.payloads)
        except Exception as e:  # a bad request must not take the store down
            return self._error(job, f"{type(e).__name__}: {e}")
        return [job.identity, protocol.encode_reply(job.request_id, body), *out]

    def _error(self, job: _Job, reason: str) -> list[bytes | memoryview]:
        with self._lock:
            self._warnings.warn("bad_request", reason)
        return [job.identity, protocol.encode_reply(job.request_id, protocol.Error(reason))]

    def _answer(
        self, request: protocol.Request, payloads: Sequence[zmq.Frame]
    ) -> tuple[protocol.Reply, list[bytes | memoryview]]:
        store = self.store
        match request:
            case protocol.Get(namespace, hashes):
                blocks = store.get_many(_keys(namespace, hashes))
                found = [data is not None for data in blocks]
                return protocol.GetReply(found), [data for data in blocks if data is not None]
            case protocol.Put(namespace, hashes):
                if len(payloads) != len(hashes):
                    raise protocol.ProtocolError(
                        f"put of {len(hashes)} blocks with {len(payloads)} payloads"
                    )
                keys = _keys(namespace, hashes)
                # The frames are this process's: the host tier keeps them without a copy.
                stored = sum(
                    store.put(key, frame.buffer, owned=True)
                    for key, frame in zip(keys, payloads, strict=True)
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


@dataclass(frozen=True)
class _Readahead:
    """The server's own job for a worker, no reply: hint a lookup's hit into the page
    cache."""

    keys: list[BlockKey]


@dataclass(frozen=True)
class _Job:
    identity: bytes
    request_id: int
    request: protocol.Request | Exception  # the decoding error of a bad request
    payloads: Sequence[zmq.Frame]


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
    # Started by a vLLM worker's pinned thread, the store would inherit its one core.
    allow_all_cpus()
    # A lookup waits for the GIL while a worker copies a block: switch more often.
    sys.setswitchinterval(0.001)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d; exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return serve(config, args.linger_s, args.owner_pid, args.spawn_lock_fd, stop)


if __name__ == "__main__":
    raise SystemExit(main())
