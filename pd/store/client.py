"""``StoreClient``: how an engine process (scheduler or worker) uses the node's store.

Every call is bounded and none raises for the store's sake: a timeout, a dead or
refusing store, or a broken socket is a miss (``PrefixHit(0, 0)``, ``None``, ``0``), so
the engine recomputes. After a failure the client stays down for a second (calls miss
at once), then checks the store again, starting a new store process if it is gone
(``pd.store.spawn``), at most once a second. A restarted store is told the namespaces
registered before.

Each thread gets its own DEALER socket, so a saver thread's large put does not delay
the scheduler's lookup. The first call of a client may wait up to ``start_wait_s`` for
the store process to start; later calls never wait longer than their deadline (a
respawn after that is started in passing and its calls miss until it answers).

Deadlines: ``timeout_ms`` for a call, plus, for a ``get_many`` or ``put_many``, the time
its bytes take at ``SLOW_TRANSFER_BYTES_PER_S`` (a busy machine moves a few MiB in
hundreds of ms; the scheduler's lookups carry no payload and stay at ``timeout_ms``).
A failed reconnect doubles the wait before the next one, up to ``MAX_RETRY_INTERVAL_S``,
so a store that hangs (it accepts calls but does not answer) stalls a scheduler for
one ``timeout_ms`` per interval, a shrinking share of its time.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import cast

import zmq

from pd.store import protocol
from pd.store.config import StoreConfig
from pd.store.keys import StoreNamespace
from pd.store.spawn import _listening, context, ensure_server
from pd.store.stats import StoreStats, WarningLimiter
from pd.store.tier import Payload
from pd.store.tiered import PrefixHit

logger = logging.getLogger(__name__)

RETRY_INTERVAL_S = 1.0  # down after a failed call, before the store is checked again
MAX_RETRY_INTERVAL_S = 16.0  # doubling from RETRY_INTERVAL_S per failed reconnect
# A get or put may take timeout_ms plus its bytes at this rate: on a 2-core machine at
# load 11, a get of 8 MiB took up to 0.9 s (docs/store.md, "The client").
SLOW_TRANSFER_BYTES_PER_S = 8 * 2**20
DEFAULT_START_WAIT_S = 10.0

_Frames = list[zmq.Frame]


class StoreClient:
    """Talks to the node's store process for ``config.socket_dir``; thread-safe."""

    def __init__(self, config: StoreConfig, start_wait_s: float = DEFAULT_START_WAIT_S) -> None:
        self.config = config
        self._timeout_ms = config.timeout_ms
        self._start_wait_s = start_wait_s
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._local = threading.local()
        self._sockets: list[zmq.Socket[bytes]] = []
        self._pid = os.getpid()
        self._namespaces: dict[bytes, StoreNamespace] = {}
        self._connected = False
        self._started_once = False
        self._failed_at = 0.0
        self._retry_interval_s = RETRY_INTERVAL_S
        self._closed = False
        self._warnings = WarningLimiter(logger, {})
        self.failed_calls = 0  # calls answered with a miss because the store failed
        self.reconnects = 0  # times the store answered again after a failure

    # -- the contract -----------------------------------------------------------------

    def register(self, namespace: StoreNamespace) -> None:
        with self._lock:
            self._namespaces[namespace.digest] = namespace
        self._call(protocol.Register(namespace))

    def lookup(self, namespace: StoreNamespace, block_hashes: Sequence[bytes]) -> PrefixHit:
        """The leading stored blocks of ``block_hashes``; ``PrefixHit(0, 0)`` on failure."""
        if not block_hashes:
            return PrefixHit(0, 0)
        result = self._call(protocol.Lookup(namespace.digest, _hashes(block_hashes)))
        if result is None or not isinstance(result[0], protocol.LookupReply):
            return PrefixHit(0, 0)
        reply = result[0]
        return PrefixHit(reply.host_blocks, reply.disk_blocks)

    def get_many(
        self, namespace: StoreNamespace, block_hashes: Sequence[bytes], expected_bytes: int = 0
    ) -> list[memoryview | None]:
        """Each block's bytes, ``None`` for a miss; all ``None`` on failure. The bytes
        are views of the received message (a copy of a 16-block load cost ~3 ms).

        ``expected_bytes`` (the blocks' total size, when the caller knows it) extends the
        call's deadline by the time those bytes take at ``SLOW_TRANSFER_BYTES_PER_S``.
        """
        misses: list[memoryview | None] = [None] * len(block_hashes)
        if not block_hashes:
            return misses
        result = self._call(
            protocol.Get(namespace.digest, _hashes(block_hashes)), nbytes=expected_bytes
        )
        if result is None or not isinstance(result[0], protocol.GetReply):
            return misses
        reply, frames = result
        assert isinstance(reply, protocol.GetReply)
        if len(reply.found) != len(block_hashes) or sum(reply.found) != len(frames):
            self._failed(f"malformed get reply ({len(frames)} frames for {reply.found})")
            return misses
        payloads = iter(frames)
        return [next(payloads).buffer if found else None for found in reply.found]

    def put_many(self, namespace: StoreNamespace, items: Sequence[tuple[bytes, Payload]]) -> int:
        """Store ``(block hash, payload)`` pairs; the number stored, 0 on failure.

        Payloads are sent without copying: the caller keeps them unchanged until this
        returns.
        """
        if not items:
            return 0
        hashes = [bytes(h) for h, _ in items]
        payloads = [payload for _, payload in items]
        nbytes = sum(memoryview(payload).nbytes for payload in payloads)
        result = self._call(protocol.Put(namespace.digest, hashes), payloads, nbytes)
        if result is None or not isinstance(result[0], protocol.PutReply):
            return 0
        return result[0].stored

    def stats(self) -> StoreStats | None:
        result = self._call(protocol.Stats())
        if result is None or not isinstance(result[0], protocol.StatsReply):
            return None
        return result[0].stats

    @property
    def retry_interval_s(self) -> float:
        """How long the client stays down after a failure before checking the store."""
        with self._lock:
            return self._retry_interval_s

    def close(self) -> None:
        """Close every socket; later calls miss. Call it when no call is in flight."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        if os.getpid() == self._pid:
            for sock in sockets:
                sock.close(linger=0)

    # -- one request ------------------------------------------------------------------

    def _call(
        self, body: protocol.Request, payloads: Sequence[Payload] = (), nbytes: int = 0
    ) -> tuple[protocol.Reply, _Frames] | None:
        try:
            if not self._ready():
                self._count_failed()
                return None
            budget_s = self._timeout_ms / 1000 + nbytes / SLOW_TRANSFER_BYTES_PER_S
            deadline = time.monotonic() + budget_s
            result = self._exchange(self._socket(deadline), body, payloads, deadline)
        except Exception as e:  # never let the store's trouble reach the engine
            self._drop_socket()
            self._failed(f"{type(e).__name__}: {e}")
            return None
        if result is None:
            return None
        if isinstance(result[0], protocol.Error):
            # The store answered but refused (a bad request, another version): a miss,
            # the connection itself is fine.
            self._count_failed()
            with self._lock:
                self._warnings.warn("store_error", result[0].reason)
            return None
        return result

    def _exchange(
        self,
        sock: zmq.Socket[bytes],
        body: protocol.Request,
        payloads: Sequence[Payload],
        deadline: float,
    ) -> tuple[protocol.Reply, _Frames] | None:
        request_id = next(self._ids)
        header = protocol.encode_request(request_id, os.getpid(), body)
        sent_at = time.monotonic()
        try:
            # NOBLOCK with IMMEDIATE: no store connected raises Again instead of queueing.
            sock.send_multipart([header, *payloads], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._drop_socket()
            self._failed("no store process connected")
            return None
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                self._drop_socket()  # a late reply must not answer the next call
                self._failed(f"no reply within {(deadline - sent_at) * 1000:.0f} ms")
                return None
            frames = sock.recv_multipart(copy=False)
            reply_id, reply = protocol.decode_reply(frames[0].buffer)
            if reply_id == request_id:
                return reply, list(frames[1:])

    # -- connection state -------------------------------------------------------------

    def _ready(self) -> bool:
        """Whether to try the store now; reconnects (and respawns) after a failure."""
        with self._lock:
            if self._closed:
                return False
            if os.getpid() != self._pid:  # forked: the parent's sockets are not ours
                self._pid, self._sockets, self._local = os.getpid(), [], threading.local()
                self._connected = False
            if self._connected:
                return True
            if self._started_once and time.monotonic() - self._failed_at < self._retry_interval_s:
                return False
        if not self._connect_lock.acquire(blocking=False):
            return False  # another thread is reconnecting; this call misses
        try:
            with self._lock:
                if self._connected:
                    return True
                first = not self._started_once
                self._started_once = True
            wait_s = self._start_wait_s if first else 0.0
            if not ensure_server(self.config, wait_s):
                with self._lock:
                    self._failed_at = time.monotonic()
                    if not first:  # still gone (or hung): try less often
                        self._retry_interval_s = min(
                            2 * self._retry_interval_s, MAX_RETRY_INTERVAL_S
                        )
                if first:
                    logger.warning(
                        "KV store at %s did not answer within %.0f s; misses until it does",
                        self.config.socket_dir,
                        wait_s,
                    )
                return False
            with self._lock:
                self._connected = True
                self._retry_interval_s = RETRY_INTERVAL_S
                namespaces = list(self._namespaces.values())
                if not first:
                    self.reconnects += 1
            if not first:
                logger.info("KV store at %s answers again", self.config.socket_dir)
            for namespace in namespaces:  # a restarted store has not seen them
                deadline = time.monotonic() + self._timeout_ms / 1000
                self._exchange(self._socket(deadline), protocol.Register(namespace), (), deadline)
            return self._connected
        finally:
            self._connect_lock.release()

    def _failed(self, reason: str) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            self._failed_at = time.monotonic()
            self.failed_calls += 1
            self._warnings.warn("store_unavailable", f"{self.config.socket_dir}: {reason}")
        if was_connected:
            logger.debug("KV store call failed: %s", reason)

    def _count_failed(self) -> None:
        with self._lock:
            self.failed_calls += 1

    def _socket(self, deadline: float) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "socket", None)
        if sock is None:
            sock = context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.connect(self.config.endpoint)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
            _wait_connected(sock, deadline)
        return sock

    def _drop_socket(self) -> None:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "socket", None)
        if sock is None:
            return
        self._local.socket = None
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)
        sock.close(linger=0)


def read_stats(config: StoreConfig, timeout_ms: int) -> StoreStats | None:
    """The serving store's stats, or None when none answers within ``timeout_ms``.

    For observers (the instance's /metrics): it never starts a store, and its pid 0
    keeps none alive, as a ping's does.
    """
    if not _listening(config.socket_path):
        return None
    sock = context().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(config.endpoint)
        sock.send(protocol.encode_request(0, 0, protocol.Stats()))
        if not sock.poll(timeout_ms):
            return None
        _, reply = protocol.decode_reply(sock.recv())
        return reply.stats if isinstance(reply, protocol.StatsReply) else None
    except (zmq.ZMQError, protocol.ProtocolError):
        return None
    finally:
        sock.close(linger=0)


def _hashes(block_hashes: Sequence[bytes]) -> list[bytes]:
    return [bytes(h) for h in block_hashes]


def _wait_connected(sock: zmq.Socket[bytes], deadline: float) -> None:
    """Give a new socket's connection until ``deadline`` to come up (IMMEDIATE fails a
    send until then); a store that is down shows as the send's ``Again``."""
    while not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT and time.monotonic() < deadline:
        time.sleep(0.002)
