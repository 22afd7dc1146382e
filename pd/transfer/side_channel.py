"""The side channel: handshakes and lease releases between decode and prefill workers.

Each prefill worker serves one ROUTER socket (a free port unless configured; the
scheduler advertises it in ``kv_transfer_params``). A decode worker says ``Hello``
once per prefill worker and learns its KV layout and transport endpoint from the
``Welcome``; after each load (or when giving up) it sends ``Release`` so the prefill
worker frees the blocks before the lease would expire. The side channel is the same
for every transport.
"""

from __future__ import annotations

import logging
import threading
import time

import msgspec
import zmq

from pd.transfer import messages as msg
from pd.transfer.lease import LeaseTable
from pd.transfer.stats import TransferCounters

logger = logging.getLogger(__name__)

_POLL_INTERVAL_MS = 100


class HandshakeError(RuntimeError):
    """The prefill worker could not be reached or refused us within the deadline."""


class SideChannelServer:
    """Prefill side: answers ``Hello`` and applies ``Release``. One thread."""

    def __init__(
        self,
        host: str,
        port: int,
        welcome: msg.Welcome,
        leases: LeaseTable,
        counters: TransferCounters,
    ) -> None:
        self._host = host
        self._counters = counters
        self._requested_port = port
        self._welcome = msg.encode(welcome)
        self._leases = leases
        self._context: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.port: int | None = None

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

    def _serve(self, router: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(_POLL_INTERVAL_MS):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 2:
                    continue
                identity, payload = frames
                try:
                    message = msg.decode(payload)
                except msgspec.DecodeError:
                    logger.warning("pd side channel: dropped an undecodable message")
                    continue
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
                elif isinstance(message, msg.Release):
                    self._leases.release(message.request_id)
                    if message.loaded:
                        self._counters.add(
                            blocks_sent=message.num_blocks, bytes_sent=message.nbytes
                        )
        finally:
            router.close(linger=0)


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
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{host}:{port}")
            sock.send(msg.encode(msg.Hello(msg.PROTOCOL_VERSION, self._engine_id)))
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                raise HandshakeError(f"no answer from prefill side channel {host}:{port}")
            reply = msg.decode(sock.recv())
        except msgspec.DecodeError as e:
            raise HandshakeError(f"garbled answer from {host}:{port}: {e}") from e
        finally:
            sock.close(linger=0)
        if isinstance(reply, msg.Refused):
            raise HandshakeError(f"prefill {host}:{port} refused the handshake: {reply.reason}")
        if not isinstance(reply, msg.Welcome):
            raise HandshakeError(f"unexpected answer {type(reply).__name__} from {host}:{port}")
        return reply

    def release(
        self,
        host: str,
        port: int,
        request_id: str,
        loaded: bool,
        num_blocks: int = 0,
        nbytes: int = 0,
    ) -> None:
        """Tell the prefill worker it may free ``request_id``'s blocks. Never blocks."""
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
            sock.send(msg.encode(msg.Release(request_id, loaded, num_blocks, nbytes)), zmq.NOBLOCK)
        except zmq.Again:
            # The peer is unreachable and the queue is full: its lease expiry frees it.
            logger.warning("pd: could not queue the release of %s to %s", request_id, endpoint)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._context.term()
