"""Both transports (ZMQ+TCP and NIXL over UCX): two transports in one process, real
sockets and real NIXL agents on loopback."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import torch
import zmq

from pd.transfer.layout import KVCacheLayout
from pd.transfer.lease import LeaseTable
from pd.transfer.transport import TransferError, TransferInFlight, get_transport_class
from pd.vllm_server import free_port
from tests.harness.kv_layouts import BLOCK_SIZE, NUM_BLOCKS, make_layout
from tests.harness.nixl_peer import peer_process, serve_blocks


@pytest.fixture(params=["zmq", "nixl"])
def transport_name(request) -> str:
    return request.param


def transport_pair(name: str):
    src_layout, src_caches = make_layout(seed=0)
    dst_layout, dst_caches = make_layout(seed=None)
    leases = LeaseTable(lease_timeout_s=60)
    cls = get_transport_class(name)
    server = cls(src_layout, "127.0.0.1")
    client = cls(dst_layout, "127.0.0.1")
    server.start(leases.may_read)
    client.start(lambda *_: False)
    yield server, client, leases, src_caches, dst_caches
    client.close()
    server.close()


@pytest.fixture
def pair(transport_name):
    yield from transport_pair(transport_name)


@pytest.fixture
def zmq_pair():
    """ZMQ alone: it checks leases itself (NIXL reads are one-sided; leases live above)."""
    yield from transport_pair("zmq")


def blocks_equal(src, dst, src_ids, dst_ids) -> bool:
    return all(
        torch.equal(src[name][:, s], dst[name][:, d])
        for name in src
        for s, d in zip(src_ids, dst_ids, strict=True)
    )


def test_random_blocks_round_trip_into_arbitrary_ids(pair):
    server, client, leases, src, dst = pair
    rng = random.Random(7)
    src_ids = [*rng.sample(range(NUM_BLOCKS), 20), 30, 31, 32, 33]  # scattered and a run
    dst_ids = rng.sample(range(NUM_BLOCKS), len(src_ids))
    leases.grant("req-1", src_ids)
    nbytes = client.read_blocks(server.metadata(), "req-1", src_ids, dst_ids, time.monotonic() + 10)
    assert nbytes == len(src_ids) * server.layout.bytes_per_block
    assert blocks_equal(src, dst, src_ids, dst_ids)
    untouched = set(range(NUM_BLOCKS)) - set(dst_ids)
    assert all(dst[n][:, b].abs().sum() == 0 for n in dst for b in untouched)


def test_concurrent_reads(pair):
    server, client, leases, src, dst = pair
    jobs = [(f"r{i}", list(range(i * 8, i * 8 + 8))) for i in range(8)]
    for rid, ids in jobs:
        leases.grant(rid, ids)
    dst_for = {rid: list(reversed(ids)) for rid, ids in jobs}
    errors = []

    def read(rid, ids):
        try:
            client.read_blocks(server.metadata(), rid, ids, dst_for[rid], time.monotonic() + 10)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for rid, ids in jobs:
        assert blocks_equal(src, dst, ids, dst_for[rid])


def test_read_before_the_grant_is_served(zmq_pair):
    """The scheduler holds the blocks before the worker hears of the lease."""
    server, client, _, src, dst = zmq_pair
    client.read_blocks(server.metadata(), "granted-later", [1, 2], [5, 6], time.monotonic() + 10)
    assert blocks_equal(src, dst, [1, 2], [5, 6])


def test_blocks_outside_the_lease_are_refused(zmq_pair):
    server, client, leases, _, _ = zmq_pair
    leases.grant("mine", [1, 2])
    with pytest.raises(TransferError, match="refused"):
        client.read_blocks(server.metadata(), "mine", [1, 2, 3], [4, 5, 6], time.monotonic() + 5)


def test_read_after_the_lease_ended_is_refused(zmq_pair):
    server, client, leases, _, _ = zmq_pair
    leases.grant("done", [1])
    leases.release("done")
    with pytest.raises(TransferError, match="lease ended"):
        client.read_blocks(server.metadata(), "done", [1], [1], time.monotonic() + 5)


def test_silent_peer_fails_at_the_deadline():
    layout, _ = make_layout(seed=None)
    client = get_transport_class("zmq")(layout, "127.0.0.1")
    client.start(lambda *_: False)
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # accepts, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        started = time.monotonic()
        with pytest.raises(TransferError, match="deadline"):
            client.read_blocks({"endpoint": f"tcp://127.0.0.1:{port}"}, "r", [1], [1],
                               started + 0.5)  # fmt: skip
        assert time.monotonic() - started < 2
    finally:
        silent.close(linger=0)
        client.close()


def test_unreachable_zmq_peer_fails_within_the_deadline():
    layout, _ = make_layout(seed=None)
    client = get_transport_class("zmq")(layout, "127.0.0.1")
    client.start(lambda *_: False)
    try:
        dead = {"endpoint": f"tcp://127.0.0.1:{free_port()}"}
        started = time.monotonic()
        with pytest.raises(TransferError, match="deadline"):
            client.read_blocks(dead, "r", [1], [1], started + 1.0)
        assert time.monotonic() - started < 3
    finally:
        client.close()


@pytest.mark.parametrize("name", ["zmq", "nixl"])
def test_killed_peer_gives_an_error_within_the_deadline(name):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    peer_process = ctx.Process(target=serve_blocks, args=(name, child), daemon=True)
    peer_process.start()
    layout, caches = make_layout(seed=None)
    client = get_transport_class(name)(layout, "127.0.0.1")
    client.start(lambda *_: False)
    try:
        assert parent.poll(60), "peer did not start"
        peer = parent.recv()
        client.read_blocks(peer, "before", [1, 2], [3, 4], time.monotonic() + 30)
        assert torch.equal(caches["layer.0"][:, 3], _seeded_block(0, 1))
        os.kill(peer_process.pid, signal.SIGKILL)
        peer_process.join(10)
        started = time.monotonic()
        with pytest.raises(TransferError):
            client.read_blocks(peer, "after", [5], [6], started + 3.0)
        assert time.monotonic() - started < 6
    finally:
        client.close()
        if peer_process.is_alive():
            peer_process.kill()


def _seeded_block(layer: int, block: int) -> torch.Tensor:
    _, caches = make_layout(seed=0)
    return caches[f"layer.{layer}"][:, block]


def test_nixl_peer_with_other_layout_is_refused():
    src_layout, _ = make_layout(seed=0)
    other = KVCacheLayout.from_kv_caches(
        {"l": torch.zeros((2, NUM_BLOCKS, 4, BLOCK_SIZE, 8), dtype=torch.bfloat16)},
        NUM_BLOCKS,
        BLOCK_SIZE,
    )
    cls = get_transport_class("nixl")
    server, client = cls(other, "127.0.0.1"), cls(src_layout, "127.0.0.1")
    server.start(lambda *_: True)
    client.start(lambda *_: False)
    try:
        with pytest.raises(TransferError, match="regions differ"):
            client.connect(server.metadata())
    finally:
        client.close()
        server.close()


def test_transport_is_usable_after_a_failed_read(zmq_pair):
    server, client, leases, src, dst = zmq_pair
    leases.grant("gone", [1])
    leases.release("gone")
    with pytest.raises(TransferError):
        client.read_blocks(server.metadata(), "gone", [1], [1], time.monotonic() + 2)
    leases.grant("after", [9])
    client.read_blocks(server.metadata(), "after", [9], [10], time.monotonic() + 5)
    assert blocks_equal(src, dst, [9], [10])


def test_nixl_read_given_up_at_its_deadline_is_held_until_it_ends(monkeypatch):
    """A READ to a stalled peer cannot be recalled (UCX completes it when the peer resumes,
    into whatever the blocks hold by then): the transport hands it back unfinished, and
    once its ``settle`` says it ended nothing of it lands any more."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # as across hosts: the peer's side serves the read
    layout, caches = make_layout(seed=None)
    with peer_process("nixl") as peer:
        client = get_transport_class("nixl")(layout, "127.0.0.1")
        client.start(lambda *_: False)
        try:
            client.read_blocks(peer.metadata, "before", [1], [1], time.monotonic() + 30)
            peer.stop()  # a stalled peer (or a cut link)
            blocks = list(range(5, 13))
            started = time.monotonic()
            with pytest.raises(TransferInFlight, match="deadline") as given_up:
                client.read_blocks(peer.metadata, "stalled", blocks, blocks, started + 1.0)
            assert time.monotonic() - started < 3
            # Not ended while the peer is stopped: whoever holds the blocks keeps them.
            assert not given_up.value.settle(time.monotonic() + 2)
            peer.resume()
            assert given_up.value.settle(time.monotonic() + 30)
            # Ended: the blocks may be reused now, and nothing lands in them later.
            for cache in caches.values():
                cache[:, 5:13].zero_()
            time.sleep(2)
            assert all(cache[:, 5:13].abs().sum().item() == 0 for cache in caches.values())
            # The resumed peer serves again on the same connection.
            client.read_blocks(peer.metadata, "after", [2], [2], time.monotonic() + 30)
            assert torch.equal(caches["layer.0"][:, 2], _seeded_block(0, 2))
        finally:
            client.close()
