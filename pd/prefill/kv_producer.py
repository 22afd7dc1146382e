"""Prefill role, worker side: serve leased blocks to decode instances.

Owns the lease table, the side-channel server (handshakes and releases) and the
serving half of the transports. The engine thread grants leases from each step's
metadata and collects ended leases for vLLM to free; everything else runs on the
side-channel and transport threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pd.prefill.rendezvous import RendezvousBook
from pd.transfer.lease import LeaseTable
from pd.transfer.messages import PROTOCOL_VERSION, Welcome
from pd.transfer.side_channel import SideChannelServer
from pd.transfer.stats import TransferCounters
from pd.transfer.transport.base import KVTransport

logger = logging.getLogger(__name__)


class KVProducer:
    def __init__(
        self,
        engine_id: str,
        tp_rank: int,
        transports: list[KVTransport],
        host: str,
        side_channel_port: int,
        lease_timeout_s: float,
        counters: TransferCounters,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.leases = LeaseTable(lease_timeout_s, on_release=on_release)
        self.rendezvous = RendezvousBook(memory_s=2 * lease_timeout_s)
        self._counters = counters
        self._transports = transports
        self._engine_id = engine_id
        self._tp_rank = tp_rank
        self._host = host
        self._side_channel_port = side_channel_port
        self._side_channel: SideChannelServer | None = None

    def start(self) -> None:
        """Serve handshakes and releases; the transports were started by the worker."""
        welcome = Welcome(
            protocol_version=PROTOCOL_VERSION,
            engine_id=self._engine_id,
            tp_rank=self._tp_rank,
            layout=self._transports[0].layout.spec(),
            transports={t.name: t.metadata() for t in self._transports},
        )
        self._side_channel = SideChannelServer(
            self._host,
            self._side_channel_port,
            welcome,
            self.leases,
            self.rendezvous,
            self._counters,
        )
        self._side_channel.start()

    @property
    def side_channel_port(self) -> int:
        assert self._side_channel is not None and self._side_channel.port is not None
        return self._side_channel.port

    def grant(
        self,
        leases: dict[str, list[int]],
        rendezvous: dict[str, str],
        failed_rendezvous: list[str],
    ) -> None:
        """Hold new leases; answer decode workers waiting on their rendezvous."""
        for request_id, block_ids in leases.items():
            self.leases.grant(request_id, block_ids)
            tag = rendezvous.get(request_id)
            if tag and not self.rendezvous.fulfil(tag, request_id, block_ids):
                self.leases.release(request_id)  # decode gave up before the grant
        for tag in failed_rendezvous:
            self.rendezvous.fail(tag, "the prefill request ended without KV (aborted?)")
        if leases:
            self._counters.add(leases_granted=len(leases))
        if (rendezvous or failed_rendezvous) and self._side_channel is not None:
            self._side_channel.wake()

    @property
    def busy(self) -> bool:
        """Whether blocks are held for a decode instance that has not read them yet."""
        return len(self.leases) > 0

    def take_finished_sending(self) -> set[str]:
        """Requests whose blocks vLLM may free now: released or expired leases."""
        ended = self.leases.take_ended()
        if ended.expired:
            logger.warning(
                "pd: %d lease(s) expired unclaimed, blocks freed: %s",
                len(ended.expired),
                ended.expired[:8],
            )
        self._counters.add(leases_released=len(ended.released), leases_expired=len(ended.expired))
        return {*ended.released, *ended.expired}

    def close(self) -> None:
        if self._side_channel is not None:
            self._side_channel.close()
