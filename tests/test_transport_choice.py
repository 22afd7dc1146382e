"""The decode side's consumer against a real side channel and real transports on
loopback (no engines): choosing a transport per peer, and waiting on a rendezvous
for a prefill that has not finished yet."""

from __future__ import annotations

import base64
import time

import pytest
import torch

from pd.decode.kv_consumer import KVConsumer
from pd.prefill.rendezvous import RendezvousBook
from pd.transfer.lease import LeaseTable
from pd.transfer.messages import PROTOCOL_VERSION, Welcome
from pd.transfer.metadata import LoadSpec
from pd.transfer.side_channel import SideChannelServer
from pd.transfer.stats import TransferCounters
from pd.transfer.transport import get_transport_class
from tests.harness.kv_layouts import make_layout

PREFILL_ENGINE = "prefill-engine"


@pytest.fixture
def prefill():
    """A prefill worker's serving side: both transports, a lease table, a side channel."""
    layout, caches = make_layout(seed=0)
    leases = LeaseTable(lease_timeout_s=60)
    book = RendezvousBook(memory_s=60)
    transports = {name: get_transport_class(name)(layout, "127.0.0.1") for name in ("nixl", "zmq")}
    for transport in transports.values():
        transport.start(leases.may_read)
    started = []

    def serve(offered: dict[str, dict]) -> SideChannelServer:
        welcome = Welcome(PROTOCOL_VERSION, PREFILL_ENGINE, 0, layout.spec(), offered)
        server = SideChannelServer("127.0.0.1", 0, welcome, leases, book, TransferCounters())
        server.start()
        started.append(server)
        return server

    serve.book = book
    yield serve, transports, leases, caches
    for server in started:
        server.close()
    for transport in transports.values():
        transport.close()


class Decode:
    """A decode worker's loading side: its own KV cache, both transports, a consumer."""

    def __init__(self, rendezvous_timeout_s: float = 10) -> None:
        layout, self.caches = make_layout(seed=None)
        self.transports = [get_transport_class(n)(layout, "127.0.0.1") for n in ("nixl", "zmq")]
        for transport in self.transports:
            transport.start(lambda *_: False)
        self.counters = TransferCounters()
        self.consumer = KVConsumer("decode-engine", 0, self.transports, 10, 3,
                                   rendezvous_timeout_s, 2, self.counters)  # fmt: skip
        self.consumer.start()

    def results(self, timeout_s: float = 20):
        deadline = time.monotonic() + timeout_s
        while not (results := self.consumer.take_results()).finished:
            assert time.monotonic() < deadline, "load never finished"
            time.sleep(0.05)
        return results

    def stats(self) -> dict:
        stats = self.counters.snapshot()
        return stats.data if stats else {}

    def close(self) -> None:
        self.consumer.close()
        for transport in self.transports:
            transport.close()


def spec_for(port: int, rendezvous: str = "") -> LoadSpec:
    remote = ("", ()) if rendezvous else ("p-req", (1, 2, 3))
    return LoadSpec("d-req", remote[0], PREFILL_ENGINE, "127.0.0.1", (port,), remote[1],
                    (7, 8, 9), reports_completion=True, rendezvous=rendezvous)  # fmt: skip


def load_once(side_channel_port: int, leases: LeaseTable):
    decode = Decode()
    leases.grant("p-req", [1, 2, 3])
    try:
        decode.consumer.submit([spec_for(side_channel_port)])
        return decode.results(), decode.stats(), decode.caches
    finally:
        decode.close()


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


# --- rendezvous: decode asks before prefill has finished the prompt ---------------------


def test_rendezvous_load_waits_for_the_grant(prefill):
    serve, transports, leases, src = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    decode = Decode()
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="tag-1")])
        time.sleep(0.3)  # the prefill instance is still computing
        assert not decode.consumer.take_results().finished
        leases.grant("p-req", [1, 2, 3])
        assert serve.book.fulfil("tag-1", "p-req", [1, 2, 3])
        server.wake()
        results = decode.results()
        assert results.finished == {"d-req"} and not results.failed
        assert blocks_moved(src, decode.caches)
        assert released(leases) == ["p-req"]
    finally:
        decode.close()


def test_rendezvous_answered_at_once_when_prefill_was_first(prefill):
    serve, transports, leases, src = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    leases.grant("p-req", [1, 2, 3])
    serve.book.fulfil("tag-2", "p-req", [1, 2, 3])
    decode = Decode()
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="tag-2")])
        results = decode.results()
        assert results.finished == {"d-req"} and not results.failed
        assert blocks_moved(src, decode.caches)
    finally:
        decode.close()


def test_failed_prefill_ends_the_wait(prefill):
    serve, transports, _, _ = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    decode = Decode(rendezvous_timeout_s=60)
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="tag-3")])
        time.sleep(0.2)
        serve.book.fail("tag-3", "aborted")
        server.wake()
        results = decode.results(timeout_s=5)  # long before the 60 s rendezvous deadline
        assert results.failed == {"d-req"}
    finally:
        decode.close()


def test_rendezvous_deadline_fails_the_load(prefill):
    serve, transports, _, _ = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    decode = Decode(rendezvous_timeout_s=0.5)
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="never")])
        assert decode.results(timeout_s=10).failed == {"d-req"}
    finally:
        decode.close()


def test_cancelled_wait_reports_and_releases_the_later_grant(prefill):
    serve, transports, _, _ = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    decode = Decode(rendezvous_timeout_s=60)
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="tag-4")])
        time.sleep(0.2)
        decode.consumer.submit([], cancelled=["d-req"])  # the request was aborted
        results = decode.results(timeout_s=5)
        assert results.finished == {"d-req"} and results.failed == {"d-req"}
        # The prefill side learned that decode gave up: its grant will be released at once.
        deadline = time.monotonic() + 5
        while not serve.book.is_cancelled("tag-4"):
            assert time.monotonic() < deadline, "the cancellation never reached prefill"
            time.sleep(0.05)
        assert not serve.book.fulfil("tag-4", "p-req", [1])
    finally:
        decode.close()


def test_silent_prefill_worker_ends_the_wait(prefill):
    """A prefill worker that stops (here: its side channel closes) goes silent; the
    waiting load fails after handshake_timeout_s (3 s here), not the 60 s deadline."""
    serve, transports, _, _ = prefill
    server = serve({name: t.metadata() for name, t in transports.items()})
    decode = Decode(rendezvous_timeout_s=60)
    try:
        decode.consumer.submit([spec_for(server.port, rendezvous="tag-5")])
        time.sleep(4)  # Pending keeps it waiting past the 3 s silence limit...
        assert not decode.consumer.take_results().finished
        server.close()  # ...until the worker stops answering
        started = time.monotonic()
        assert decode.results(timeout_s=20).failed == {"d-req"}
        assert time.monotonic() - started < 15
    finally:
        decode.close()
