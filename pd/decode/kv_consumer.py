"""Decode role, worker side: load prompts' KV from prefill instances.

Each ``LoadSpec`` from the scheduler becomes one job on a thread pool: for a request
sent alongside its prefill, wait (``rendezvous_timeout_s``) until the prefill worker
says which blocks hold the prompt; handshake with the prefill worker (once per peer,
cached); read the blocks through the transport within the request's deadline, at
most ``max_concurrent_transfers`` at once; then release the prefill instance's lease
whatever happened. The engine thread collects results each step; a failed load is
reported so vLLM recomputes the prompt. Nothing waits without a deadline, except a
read that passed its deadline and may still land (``TransferInFlight``, a NIXL READ
to a stalled peer or over a cut link): its request is reported only once the read
has ended. Reporting it is what hands the blocks back to vLLM: a failed load is
recomputed (into these or other blocks), an aborted request's blocks are freed. vLLM
(0.32, ``Scheduler.finish_requests``) frees an aborted request that still waits for
its KV only when its load is reported, so holding the report holds the blocks in
both cases. A read that does not end within ``QUARANTINE_AFTER_S`` is counted and
logged; its blocks stay held for as long as it lasts (never reused).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pd.transfer import timeline
from pd.transfer.layout import LayoutError
from pd.transfer.messages import Welcome
from pd.transfer.metadata import LoadSpec
from pd.transfer.side_channel import HandshakeError, LoadCancelled, SideChannelClient
from pd.transfer.stats import TransferCounters
from pd.transfer.transport.base import (
    KVTransport,
    TransferError,
    TransferInFlight,
    TransportMetadata,
)

logger = logging.getLogger(__name__)

# Loads waiting for their prefill each hold a (mostly sleeping) thread.
_MAX_LOAD_THREADS = 256
# A read given up at its deadline that has not ended this long after: quarantined
# (counted, logged as an error). UCX's TCP keepalive ends one over a cut link within
# seconds; a stopped peer ends it only by resuming or dying.
QUARANTINE_AFTER_S = 60.0
_SETTLE_POLL_S = 1.0  # how often a settling load checks whether the consumer closed


@dataclass(frozen=True)
class Peer:
    """A prefill worker we handshook with, and the transport chosen to read from it."""

    transport: KVTransport
    metadata: TransportMetadata


@dataclass
class LoadResults:
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)


class KVConsumer:
    def __init__(
        self,
        engine_id: str,
        tp_rank: int,
        transports: list[KVTransport],
        transfer_timeout_s: float,
        handshake_timeout_s: float,
        rendezvous_timeout_s: float,
        max_concurrent_transfers: int,
        counters: TransferCounters,
        on_result: Callable[[], None] | None = None,
    ) -> None:
        self._on_result = on_result  # wakes an engine step waiting for progress
        self._tp_rank = tp_rank
        self._transports = transports  # best first; each peer gets the first that works
        self._transfer_timeout_s = transfer_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._rendezvous_timeout_s = rendezvous_timeout_s
        self._transfer_slots = threading.BoundedSemaphore(max_concurrent_transfers)
        self._counters = counters
        self._engine_id = engine_id
        self._side_channel: SideChannelClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._peers: dict[tuple[str, str, int], Peer] = {}
        self._peers_lock = threading.Lock()
        self._results: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._in_flight = 0
        self._waiting: set[str] = set()  # loads that may wait for their prefill
        self._cancelled: set[str] = set()
        self._waiting_lock = threading.Lock()
        self._closed = threading.Event()
        self._unsettled = 0  # loads given up whose read may still land

    def start(self) -> None:
        self._side_channel = SideChannelClient(self._engine_id)
        self._pool = ThreadPoolExecutor(_MAX_LOAD_THREADS, thread_name_prefix="pd-kv-load")

    def submit(self, loads: list[LoadSpec], cancelled: Sequence[str] = ()) -> None:
        """Start loads in the background; stop waiting for ended requests' prefills.

        Called on the engine thread, once per step.
        """
        assert self._pool is not None, "start() first"
        with self._waiting_lock:
            self._cancelled.update(r for r in cancelled if r in self._waiting)
            self._waiting.update(s.request_id for s in loads if s.rendezvous)
            self._in_flight += len(loads)
        for spec in loads:
            self._pool.submit(self._run, spec, time.monotonic())

    @property
    def busy(self) -> bool:
        """Whether any load has not ended yet."""
        return self._in_flight > 0

    @property
    def unsettled(self) -> int:
        """Loads given up at their deadline whose read has not ended: their blocks held."""
        return self._unsettled

    def take_results(self) -> LoadResults:
        """Loads that ended since the last call. ``failed`` is a subset of ``finished``."""
        results = LoadResults()
        while True:
            try:
                request_id, ok = self._results.get_nowait()
            except queue.Empty:
                return results
            results.finished.add(request_id)
            if not ok:
                results.failed.add(request_id)

    def close(self) -> None:
        self._closed.set()  # settling loads stop waiting: the engine is going away
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._side_channel is not None:
            self._side_channel.close()
            self._side_channel = None

    # --- one load, on a pool thread -------------------------------------------------------

    def _run(self, spec: LoadSpec, submitted: float) -> None:
        ok, nbytes = False, 0
        started = submitted
        in_flight: TransferInFlight | None = None
        try:
            if spec.rendezvous and spec.local_block_ids:
                spec = self._resolve(spec, submitted + self._rendezvous_timeout_s)
            started = time.monotonic()
            timeline.mark("load_started", spec.request_id)
            nbytes = self._load(spec, started + self._transfer_timeout_s)
            timeline.mark("load_ended", spec.request_id)
            ok = True
        except LoadCancelled as e:
            logger.info("pd: load of %s cancelled: %s", spec.request_id, e)
        except (HandshakeError, TransferError, LayoutError, ValueError) as e:
            logger.warning(
                "pd: KV load of %s from %s failed (%s); recomputing the prompt%s",
                spec.request_id,
                spec.remote_host or "<no address>",
                e,
                " once the read has ended" if isinstance(e, TransferInFlight) else "",
            )
            if isinstance(e, HandshakeError):
                self._counters.add(handshake_failures=1)
            if isinstance(e, TransferInFlight):
                in_flight = e
            # The peer may be gone or restarted: the next load handshakes afresh, so a dead
            # peer costs one handshake deadline rather than a whole transfer deadline.
            self._forget_peer(spec)
        except Exception:
            logger.exception("pd: KV load of %s crashed; recomputing the prompt", spec.request_id)
        finally:
            with self._waiting_lock:
                self._waiting.discard(spec.request_id)
                self._cancelled.discard(spec.request_id)
            # The lease ends now even for a read still in flight: what the prefill
            # instance does with its blocks only changes bytes this load discards.
            if in_flight is not None:
                self._release(spec, ok, nbytes)
        try:
            self._report(spec, ok, nbytes, started, submitted, in_flight)
        finally:
            with self._waiting_lock:
                self._in_flight -= 1
            if in_flight is None:
                # After the report: the release is a round trip to prefill (its core
                # busy), and decode schedules the request meanwhile.
                self._release(spec, ok, nbytes)

    def _report(
        self,
        spec: LoadSpec,
        ok: bool,
        nbytes: int,
        started: float,
        submitted: float,
        in_flight: TransferInFlight | None,
    ) -> None:
        if in_flight is not None and not self._settle(spec.request_id, in_flight):
            return  # closing with the read in flight: nobody is left to report to
        logger.debug(
            "pd: load of %s: %s, %d blocks, %d bytes, %.1f ms (after %.1f ms waiting)",
            spec.request_id,
            "ok" if ok else "failed",
            len(spec.local_block_ids),
            nbytes,
            1000 * (time.monotonic() - started),
            1000 * (started - submitted),
        )
        if spec.reports_completion:
            if ok:
                self._counters.add(
                    transfers=1, blocks_received=len(spec.local_block_ids), bytes_received=nbytes
                )
                self._counters.observe(transfer_seconds=time.monotonic() - started)
            else:
                self._counters.add(transfer_failures=1)
            timeline.mark("result_queued", spec.request_id)
            self._results.put((spec.request_id, ok))
            if self._on_result is not None:
                self._on_result()

    def _settle(self, request_id: str, in_flight: TransferInFlight) -> bool:
        """Wait until a read given up at its deadline has ended; False if closed first.

        Its request stays unreported meanwhile, so vLLM keeps its blocks."""
        self._counters.add(transfers_held=1)
        with self._waiting_lock:
            self._unsettled += 1
        started = time.monotonic()
        quarantined = False
        try:
            while not self._closed.is_set():
                if in_flight.settle(time.monotonic() + _SETTLE_POLL_S):
                    logger.info(
                        "pd: the read of %s ended %.1f s after its deadline; its blocks are "
                        "vLLM's again",
                        request_id,
                        time.monotonic() - started,
                    )
                    return True
                if not quarantined and time.monotonic() - started >= QUARANTINE_AFTER_S:
                    quarantined = True
                    self._counters.add(transfers_quarantined=1)
                    logger.error(
                        "pd: the read of %s has not ended %.0f s after its deadline (peer "
                        "stopped?); its %s stays unreported and its blocks held until it does",
                        request_id,
                        QUARANTINE_AFTER_S,
                        "request",
                    )
            return False
        finally:
            with self._waiting_lock:
                self._unsettled -= 1

    def _resolve(self, spec: LoadSpec, deadline: float) -> LoadSpec:
        """Wait until the prefill worker holds the prompt's KV; the load, now addressed."""
        if not spec.remote_host:
            raise ValueError("no prefill address in kv_transfer_params")
        assert self._side_channel is not None
        answer = self._side_channel.resolve(
            spec.remote_host,
            self._port_of(spec),
            spec.rendezvous,
            deadline,
            silence_s=self._handshake_timeout_s,
            cancelled=lambda: spec.request_id in self._cancelled,
        )
        if answer.engine_id != spec.remote_engine_id:
            raise HandshakeError(
                f"prefill engine is {answer.engine_id}, expected {spec.remote_engine_id}"
            )
        return spec.resolved(answer.request_id, answer.block_ids)

    def _load(self, spec: LoadSpec, deadline: float) -> int:
        if not spec.remote_host:
            raise ValueError("no prefill address in kv_transfer_params")
        if not spec.local_block_ids:
            return 0
        port = self._port_of(spec)
        peer = self._peer(spec.remote_engine_id, spec.remote_host, port, deadline)
        if not self._transfer_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferError("no transfer slot free before the deadline")
        try:
            nbytes = peer.transport.read_blocks(
                peer.metadata,
                spec.remote_request_id,
                list(spec.remote_block_ids),
                list(spec.local_block_ids),
                deadline,
            )
        finally:
            self._transfer_slots.release()
        self._counters.add(**{f"transfers_via_{peer.transport.name}": 1})
        return nbytes

    def _port_of(self, spec: LoadSpec) -> int:
        if len(spec.remote_ports) <= self._tp_rank:
            raise ValueError(
                f"prefill instance has {len(spec.remote_ports)} TP rank(s), this worker is "
                f"rank {self._tp_rank}: prefill and decode need the same tensor-parallel size"
            )
        return spec.remote_ports[self._tp_rank]

    def _peer(self, engine_id: str, host: str, port: int, deadline: float) -> Peer:
        key = (engine_id, host, port)
        with self._peers_lock:
            known = self._peers.get(key)
        if known is not None:
            return known
        assert self._side_channel is not None
        handshake_deadline = min(deadline, time.monotonic() + self._handshake_timeout_s)
        welcome = self._side_channel.handshake(host, port, handshake_deadline)
        if welcome.engine_id != engine_id:
            raise HandshakeError(
                f"{host}:{port} is engine {welcome.engine_id}, expected {engine_id} "
                "(the prefill instance restarted?)"
            )
        self._transports[0].layout.check_compatible(welcome.layout)
        peer = self._choose_transport(welcome, f"{host}:{port}")
        logger.info(
            "pd: connected to prefill engine %s rank %d at %s:%d over %s",
            engine_id,
            welcome.tp_rank,
            host,
            port,
            peer.transport.name,
        )
        with self._peers_lock:
            self._peers[key] = peer
        return peer

    def _choose_transport(self, welcome: Welcome, where: str) -> Peer:
        """The first of our transports the peer serves and that connects to it."""
        problems = []
        for transport in self._transports:
            metadata = welcome.transports.get(transport.name)
            if metadata is None:
                problems.append(f"{transport.name}: not served by the peer")
                continue
            try:
                transport.connect(metadata)
            except TransferError as e:
                problems.append(f"{transport.name}: {e}")
                logger.warning("pd: %s over %s failed (%s); trying the next transport",
                               where, transport.name, e)  # fmt: skip
                continue
            return Peer(transport=transport, metadata=metadata)
        raise HandshakeError(f"no transport works with {where}: " + "; ".join(problems))

    def _forget_peer(self, spec: LoadSpec) -> None:
        with self._peers_lock:
            for key in [k for k in self._peers if k[0] == spec.remote_engine_id]:
                del self._peers[key]

    def _release(self, spec: LoadSpec, loaded: bool, nbytes: int) -> None:
        if not spec.remote_host or not spec.remote_ports or self._side_channel is None:
            return
        try:
            port = self._port_of(spec)
        except ValueError:
            return
        self._side_channel.release(
            spec.remote_host,
            port,
            spec.remote_request_id,
            loaded,
            num_blocks=len(spec.local_block_ids) if loaded else 0,
            nbytes=nbytes,
            rendezvous=spec.rendezvous,
        )
