"""Choosing a transport per peer: the decode side's consumer against a real side
channel and real transports on loopback (no engines)."""

from __future__ import annotations

import base64
import time

import pytest
import torch

from pd.decode.kv_consumer import KVConsumer
from pd.transfer.lease import LeaseTable
from pd.transfer.messages import PROTOCOL_VERSION, Welcome
from pd.transfer.metadata import LoadSpec
from pd.transfer.side_channel import SideChannelServer
from pd.transfer.stats import TransferCounters
from pd.transfer.transport import get_transport_class
from tests.kv_layouts import make_layout

PREFILL_ENGINE = "prefill-engine"


@pytest.fixture
def prefill():
    """A prefill worker's serving side: both transports, a lease table, a side channel."""
    layout, caches = make_layout(seed=0)
    leases = LeaseTable(lease_timeout_s=60)
    transports = {name: get_transport_class(name)(layout, "127.0.0.1") for name in ("nixl", "zmq")}
    for transport in transports.values():
        transport.start(leases.may_read)
    started = []

    def serve(offered: dict[str, dict]) -> SideChannelServer:
        welcome = Welcome(PROTOCOL_VERSION, PREFILL_ENGINE, 0, layout.spec(), offered)
        server = SideChannelServer("127.0.0.1", 0, welcome, leases, TransferCounters())
        server.start()
        started.append(server)
        return server

    yield serve, transports, leases, caches
    for server in started:
        server.close()
    for transport in transports.values():
        transport.close()


def load_once(side_channel_port: int, leases: LeaseTable):
    layout, caches = make_layout(seed=None)
    transports = [get_transport_class(n)(layout, "127.0.0.1") for n in ("nixl", "zmq")]
    for transport in transports:
        transport.start(lambda *_: False)
    counters = TransferCounters()
    consumer = KVConsumer("decode-engine", 0, transports, 10, 3, 2, counters)
    consumer.start()
    leases.grant("p-req", [1, 2, 3])
    spec = LoadSpec("d-req", "p-req", PREFILL_ENGINE, "127.0.0.1", (side_channel_port,),
                    (1, 2, 3), (7, 8, 9), reports_completion=True)  # fmt: skip
    try:
        consumer.submit([spec])
        deadline = time.monotonic() + 20
        while not (results := consumer.take_results()).finished:
            assert time.monotonic() < deadline, "load never finished"
            time.sleep(0.05)
        stats = counters.snapshot()
        return results, stats.data if stats else {}, caches
    finally:
        consumer.close()
        for transport in transports:
            transport.close()


def released(leases: LeaseTable, timeout_s: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ended = leases.take_ended()
        if ended.released:
            return ended.released
        time.sleep(0.05)
    return []


def blocks_moved(src, dst) -> bool:
    return all(
        torch.equal(src[name][:, s], dst[name][:, d])
        for name in src
        for s, d in ((1, 7), (2, 8), (3, 9))
    )


def test_nixl_is_preferred_when_it_works(prefill):
    serve, transports, leases, src = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    results, stats, dst = load_once(server.port, leases)
    assert results.finished == {"d-req"} and not results.failed
    assert stats["transfers_via_nixl"] == 1 and stats["transfers_via_zmq"] == 0
    assert blocks_moved(src, dst)
    assert released(leases) == ["p-req"]


def test_failed_nixl_handshake_falls_back_to_zmq(prefill, caplog):
    serve, transports, leases, src = prefill
    broken_nixl = {**transports["nixl"].metadata(),
                   "agent_metadata": base64.b64encode(b"not NIXL metadata").decode()}  # fmt: skip
    server = serve({"nixl": broken_nixl, "zmq": transports["zmq"].metadata()})
    results, stats, dst = load_once(server.port, leases)
    assert results.finished == {"d-req"} and not results.failed
    assert stats["transfers_via_zmq"] == 1 and stats["transfers_via_nixl"] == 0
    assert blocks_moved(src, dst)
    assert "trying the next transport" in caplog.text
    assert released(leases) == ["p-req"]


def test_no_common_transport_fails_the_load(prefill):
    serve, _, leases, _ = prefill
    server = serve({"carrier-pigeon": {"loft": "north"}})
    results, stats, _ = load_once(server.port, leases)
    assert results.failed == {"d-req"}
    assert stats["handshake_failures"] == 1 and stats["transfer_failures"] == 1
    assert released(leases) == ["p-req"]  # the lease is still given back
