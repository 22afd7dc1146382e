"""The side channel: handshakes, rendezvous and lease releases between the roles.

Each prefill worker serves one ROUTER socket (a free port unless configured; the
scheduler advertises it in ``kv_transfer_params``). A decode worker says ``Hello``
once per prefill worker and learns its KV layout and transport endpoint from the
``Welcome``; a decode request sent alongside its prefill asks ``Resolve`` for the
blocks it will read (answered once the prefill engine holds them, see
``pd.prefill.rendezvous``); after each load (or when giving up) it sends ``Release``
so the prefill worker frees the blocks before the lease would expire. The side
channel is the same for every transport.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec
import zmq

from pd.transfer import messages as msg
from pd.transfer.lease import LeaseTable
from pd.transfer.stats import TransferCounters

logger = logging.getLogger(__name__)

_POLL_INTERVAL_MS = 100
_CANCEL_CHECK_MS = 50
# A parked Resolve hears ``Pending`` this often; silence means the prefill worker is gone.
PENDING_INTERVAL_S = 0.5


class HandshakeError(RuntimeError):
    """The prefill worker could not be reached or refused us within the deadline."""


class LoadCancelled(RuntimeError):
    """The decode request ended (an abort) while its load waited."""


class RendezvousOutcome(Protocol):
    """Where a rendezvous's KV is (``request_id``, ``block_ids``), or why none (``error``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def block_ids(self) -> tuple[int, ...]: ...
    @property
    def error(self) -> str: ...


class RendezvousAnswers(Protocol):
    """What the server asks of the prefill role's rendezvous book
    (``pd.prefill.rendezvous.RendezvousBook``), which the role passes in."""

    @property
    def memory_s(self) -> float: ...
    def outcome(self, rendezvous: str) -> RendezvousOutcome | None: ...
    def cancel(self, rendezvous: str) -> str | None: ...
    def forget_old(self) -> None: ...


class SideChannelServer:
    """Prefill side: answers ``Hello`` and ``Resolve``, applies ``Release``. One thread.

    ``wake()`` (any thread) makes it answer parked ``Resolve`` questions whose
    rendezvous the book now knows.
    """

    def __init__(
        self,
        host: str,
        port: int,
        welcome: msg.Welcome,
        leases: LeaseTable,
        rendezvous: RendezvousAnswers,
        counters: TransferCounters,
    ) -> None:
        self._host = host
        self._counters = counters
        self._requested_port = port
        self._welcome = msg.encode(welcome)
        self._engine_id = welcome.engine_id
        self._leases = leases
        self._book = rendezvous
        # rendezvous -> (when first asked, asking identities); answered on wake()
        self._parked: dict[str, tuple[float, list[bytes]]] = {}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._context: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.port: int | None = None

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe wakes it anyway; closed: no one to wake
            os.write(self._wake_write, b"!")

    def start(self) -> None:
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        if self._requested_port:
            try:
                router.bind(f"tcp://{self._host}:{self._requested_port}")
            except zmq.ZMQError as e:
                router.close()
                raise RuntimeError(
                    f"pd side channel cannot bind {self._host}:{self._requested_port}: {e}"
                ) from e
            self.port = self._requested_port
        else:
            self.port = router.bind_to_random_port(f"tcp://{self._host}")
        self._thread = threading.Thread(
            target=self._serve, args=(router,), name="pd-side-channel", daemon=True
        )
        self._thread.start()
        logger.info("pd side channel listening on tcp://%s:%d", self._host, self.port)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._wake_read >= 0:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1

    def _serve(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            housekeeping_at = time.monotonic()
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_INTERVAL_MS))
                if time.monotonic() >= housekeeping_at:
                    housekeeping_at = time.monotonic() + PENDING_INTERVAL_S
                    self._forget_old()
                    self._still_working(router)
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                    self._answer_parked(router)
                while router.poll(0):
                    frames = router.recv_multipart()
                    if len(frames) == 2:
                        self._handle(router, *frames)
        finally:
            router.close(linger=0)

    def _handle(self, router: zmq.Socket, identity: bytes, payload: bytes) -> None:
        try:
            message = msg.decode(payload)
        except msgspec.DecodeError:
            logger.warning("pd side channel: dropped an undecodable message")
            return
        if isinstance(message, msg.Hello):
            if message.protocol_version != msg.PROTOCOL_VERSION:
                reply = msg.encode(
                    msg.Refused(
                        f"protocol version {message.protocol_version} is not "
                        f"{msg.PROTOCOL_VERSION}: run the same pd version on both sides"
                    )
                )
            else:
                reply = self._welcome
            router.send_multipart([identity, reply])
        elif isinstance(message, msg.Resolve):
            if self._book.outcome(message.rendezvous) is None:
                parked = self._parked.setdefault(message.rendezvous, (time.monotonic(), []))
                parked[1].append(identity)
            else:
                router.send_multipart([identity, self._answer(message.rendezvous)])
        elif isinstance(message, msg.Release):
            request_id = message.request_id
            if not request_id and message.rendezvous:
                self._parked.pop(message.rendezvous, None)
                request_id = self._book.cancel(message.rendezvous) or ""
            if request_id:
                self._leases.release(request_id)
            if message.loaded:
                self._counters.add(blocks_sent=message.num_blocks, bytes_sent=message.nbytes)

    def _answer_parked(self, router: zmq.Socket) -> None:
        for rendezvous in [r for r in self._parked if self._book.outcome(r) is not None]:
            reply = self._answer(rendezvous)
            for identity in self._parked.pop(rendezvous)[1]:
                router.send_multipart([identity, reply])

    def _still_working(self, router: zmq.Socket) -> None:
        """Tell every parked asker this worker is alive (a stopped one goes silent)."""
        for rendezvous, (_, identities) in self._parked.items():
            pending = msg.encode(msg.Pending(rendezvous))
            for identity in identities:
                router.send_multipart([identity, pending])

    def _forget_old(self) -> None:
        """Questions whose asker never came back, and old book entries."""
        horizon = time.monotonic() - self._book.memory_s
        for rendezvous in [r for r, (t, _) in self._parked.items() if t <= horizon]:
            del self._parked[rendezvous]
        self._book.forget_old()

    def _answer(self, rendezvous: str) -> bytes:
        outcome = self._book.outcome(rendezvous)
        assert outcome is not None
        if outcome.error:
            return msg.encode(msg.Refused(outcome.error))
        return msg.encode(
            msg.Resolved(rendezvous, self._engine_id, outcome.request_id, list(outcome.block_ids))
        )


class SideChannelClient:
    """Decode side: handshakes (blocking, with a deadline) and releases (fire and forget).

    Safe to use from several threads: each call uses a socket of its own thread.
    """

    def __init__(self, engine_id: str) -> None:
        self._engine_id = engine_id
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def handshake(self, host: str, port: int, deadline: float) -> msg.Welcome:
        with self._asking(host, port) as sock:
            sock.send(msg.encode(msg.Hello(msg.PROTOCOL_VERSION, self._engine_id)))
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                raise HandshakeError(f"no answer from prefill side channel {host}:{port}")
            reply = msg.decode(sock.recv())
        where = f"{host}:{port}"
        return _expect(reply, msg.Welcome, where, f"prefill {where} refused the handshake")

    def resolve(
        self,
        host: str,
        port: int,
        rendezvous: str,
        deadline: float,
        silence_s: float,
        cancelled: Callable[[], bool],
    ) -> msg.Resolved:
        """Wait until the prefill worker holds the KV of ``rendezvous``; say where it is.

        Raises ``HandshakeError`` on refusal, at the deadline, or when the worker has
        sent nothing (not even ``Pending``) for ``silence_s``; ``LoadCancelled`` once
        ``cancelled()`` turns true (checked a few times a second).
        """
        with self._asking(host, port) as sock:
            sock.send(msg.encode(msg.Resolve(rendezvous)))
            heard_at = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise HandshakeError(f"prefill {host}:{port} did not finish the prompt in time")
                if now >= heard_at + silence_s:
                    raise HandshakeError(f"prefill {host}:{port} went silent for {silence_s:g} s")
                if sock.poll(min(int((deadline - now) * 1000) + 1, _CANCEL_CHECK_MS)):
                    reply = msg.decode(sock.recv())
                    heard_at = time.monotonic()
                    if not isinstance(reply, msg.Pending):
                        break
                if cancelled():
                    raise LoadCancelled(f"request ended while waiting for {host}:{port}")
        where = f"{host}:{port}"
        return _expect(reply, msg.Resolved, where, f"prefill {where} has no KV for it")

    @contextlib.contextmanager
    def _asking(self, host: str, port: int) -> Iterator[zmq.Socket]:
        """A one-question socket to a prefill worker; a garbled answer is a HandshakeError."""
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{host}:{port}")
            yield sock
        except msgspec.DecodeError as e:
            raise HandshakeError(f"garbled answer from {host}:{port}: {e}") from e
        finally:
            sock.close(linger=0)

    def release(
        self,
        host: str,
        port: int,
        request_id: str,
        loaded: bool,
        num_blocks: int = 0,
        nbytes: int = 0,
        rendezvous: str = "",
    ) -> None:
        """Tell the prefill worker it may free ``request_id``'s blocks. Never blocks.

        Without a ``request_id`` (not resolved yet) the rendezvous names the lease.
        """
        sockets: dict[str, zmq.Socket] = self._local.__dict__.setdefault("sockets", {})
        endpoint = f"tcp://{host}:{port}"
        sock = sockets.get(endpoint)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.connect(endpoint)
            sockets[endpoint] = sock
            with self._lock:
                self._sockets.append(sock)
        try:
            release = msg.Release(request_id, loaded, num_blocks, nbytes, rendezvous)
            sock.send(msg.encode(release), zmq.NOBLOCK)
        except zmq.Again:
            # The peer is unreachable and the queue is full: its lease expiry frees it.
            logger.warning("pd: could not queue the release of %s to %s", request_id, endpoint)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._context.term()


def _expect(reply: msg.Message, kind: type, where: str, refused: str) -> Any:
    """``reply`` if it is a ``kind``; otherwise a HandshakeError (``refused``: its prefix)."""
    if isinstance(reply, msg.Refused):
        raise HandshakeError(f"{refused}: {reply.reason}")
    if not isinstance(reply, kind):
        raise HandshakeError(f"unexpected answer {type(reply).__name__} from {where}")
    return reply
