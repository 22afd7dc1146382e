"""The decode consumer and a NIXL read that passes its deadline while its peer is
stopped (engine-free: a real side channel, real NIXL agents over TCP on loopback, the
prefill worker's agent in a child process so it can be SIGSTOPped).

The read cannot be recalled: UCX completes it once the peer resumes. Reporting a load
is what hands its blocks back to vLLM (recompute into them, or free them), so the
consumer reports such a load failed only after the read has ended."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pd.decode.kv_consumer import KVConsumer
from pd.prefill.rendezvous import RendezvousBook
from pd.transfer.lease import LeaseTable
from pd.transfer.messages import PROTOCOL_VERSION, Welcome
from pd.transfer.metadata import LoadSpec
from pd.transfer.side_channel import SideChannelServer
from pd.transfer.stats import TransferCounters
from pd.transfer.transport import get_transport_class
from tests.harness.kv_layouts import make_layout
from tests.harness.nixl_peer import PeerProcess, peer_process

PREFILL_ENGINE = "prefill-engine"
TRANSFER_TIMEOUT_S = 1.0


@dataclass
class Rig:
    peer: PeerProcess  # the prefill worker's NIXL agent, in a child process
    leases: LeaseTable
    side_channel_port: int
    consumer: KVConsumer


@contextmanager
def decode_against_peer(counters: TransferCounters) -> Iterator[Rig]:
    """A started consumer reading over NIXL (TCP) from a peer agent it can stall; the
    side channel stays up in this process: only the peer's agent stalls."""
    layout, _ = make_layout(seed=0)
    dst_layout, _ = make_layout(seed=None)
    leases = LeaseTable(lease_timeout_s=60)
    with peer_process("nixl") as peer:
        welcome = Welcome(PROTOCOL_VERSION, PREFILL_ENGINE, 0, layout.spec(),
                          {"nixl": peer.metadata})  # fmt: skip
        server = SideChannelServer("127.0.0.1", 0, welcome, leases, RendezvousBook(60),
                                   TransferCounters())  # fmt: skip
        server.start()
        nixl = get_transport_class("nixl")(dst_layout, "127.0.0.1")
        nixl.start(lambda *_: False)
        consumer = KVConsumer("decode-engine", 0, [nixl], TRANSFER_TIMEOUT_S, 3, 10, 2, counters)
        consumer.start()
        try:
            yield Rig(peer, leases, server.port, consumer)
        finally:
            consumer.close()
            nixl.close()
            server.close()


def test_a_load_whose_read_outlives_its_deadline_is_reported_once_the_read_ended(
    monkeypatch,
):
    monkeypatch.setenv("UCX_TLS", "tcp")  # as across hosts: the peer's side serves the read
    counters = TransferCounters()
    with decode_against_peer(counters) as rig:
        consumer = rig.consumer

        def load(request_id: str, blocks: tuple[int, ...]) -> None:
            rig.leases.grant(f"p-{request_id}", list(blocks))
            consumer.submit([LoadSpec(request_id, f"p-{request_id}", PREFILL_ENGINE,
                                      "127.0.0.1", (rig.side_channel_port,), blocks, blocks,
                                      reports_completion=True)])  # fmt: skip

        load("warm", (1,))  # handshake and connect while the peer runs
        assert _results(consumer, 20).finished == {"warm"}

        rig.peer.stop()
        load("stalled", tuple(range(5, 13)))
        time.sleep(TRANSFER_TIMEOUT_S + 2)  # well past its deadline
        # Given up, not reported: vLLM neither recomputes into its blocks nor frees them.
        assert not consumer.take_results().finished
        assert consumer.unsettled == 1 and consumer.busy
        stats = counters.snapshot()
        assert stats is not None
        assert stats.data["transfers_held"] == 1
        assert stats.data.get("transfer_failures", 0) == 0

        rig.peer.resume()
        results = _results(consumer, 30)
        assert results.finished == results.failed == {"stalled"}  # recompute, now
        assert consumer.unsettled == 0
        stats = counters.snapshot()
        assert stats is not None
        assert stats.data["transfer_failures"] == 1
        assert stats.data.get("transfers_quarantined", 0) == 0


def test_closing_the_consumer_ends_the_wait_for_a_stalled_read(monkeypatch):
    """An engine shutting down does not wait for a stopped peer."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    with decode_against_peer(TransferCounters()) as rig:
        consumer = rig.consumer
        spec = LoadSpec("r", "p-r", PREFILL_ENGINE, "127.0.0.1", (rig.side_channel_port,),
                        (1,), (1,), reports_completion=True)  # fmt: skip
        rig.peer.stop()
        consumer.submit([spec])
        deadline = time.monotonic() + 20
        while consumer.unsettled == 0:
            assert time.monotonic() < deadline, "the read was never given up"
            time.sleep(0.1)
        started = time.monotonic()
        consumer.close()
        assert time.monotonic() - started < 5
        assert not consumer.take_results().finished


def _results(consumer: KVConsumer, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (results := consumer.take_results()).finished:
        if time.monotonic() > deadline:
            pytest.fail("no load reported")
        time.sleep(0.05)
    return results
