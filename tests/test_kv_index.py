"""The proxy's KV index, its event feeds and its block hashes (engine-free).

The events are vLLM's own (its msgspec classes, encoded as its publisher does); the
feeds receive them over real ZMQ sockets: a scripted publisher on loopback TCP that
loses, repeats and restarts sequences as told, and vLLM's own ``ZmqEventPublisher``.
The hashes are checked against vLLM's own hash function.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from pd.proxy.block_hashing import BlockHasher, external_hash
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_events import EventEndpoints, EventFeed, EventFeeds, connect_address
from pd.proxy.kv_index import KVIndex

WAIT_S = 10.0
P0 = "pd-prefill-0"


def stored(hashes: list[int], medium: str | None = "GPU", tokens: list[int] | None = None,
           block_size: int = 4, parent: int | None = None) -> BlockStored:  # fmt: skip
    return BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=tokens or [],
        block_size=block_size, lora_id=None, medium=medium, lora_name=None,
    )  # fmt: skip


def removed(hashes: list[int], medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes, medium=medium)


def decoded(*events: Any) -> list[Any]:
    """Events as the proxy receives them: vLLM's encoding, decoded untyped."""
    payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))
    return msgspec.msgpack.decode(payload)[1]


# --- the index ---------------------------------------------------------------------------


def test_stored_blocks_are_found_as_a_prefix_and_removed_ones_are_not():
    index = KVIndex()
    index.apply(P0, decoded(stored([1, 2, 3])))
    assert index.cached_blocks(P0, [1, 2, 3, 4]) == 3
    assert index.cached_blocks(P0, [1, 9, 3]) == 1  # a prefix: it stops at the first miss
    assert index.block_size(P0) == 4
    index.apply(P0, decoded(removed([2])))
    assert index.cached_blocks(P0, [1, 2, 3]) == 1
    index.apply(P0, decoded(AllBlocksCleared()))
    assert index.cached_blocks(P0, [1]) == 0 and index.block_size(P0) == 4


def test_unknown_hashes_and_instances_are_harmless():
    index = KVIndex()
    index.apply(P0, decoded(removed([7]), stored([1])))  # a removal of a never stored block
    assert index.cached_blocks(P0, [1]) == 1
    assert index.cached_blocks("pd-prefill-9", [1]) == 0
    index.removed("pd-prefill-9", [1])
    index.apply(P0, [{"type": "SomethingNew", "x": 1}, "junk"])  # future event kinds
    assert index.cached_blocks(P0, []) == 0 and index.size(P0) == 1


def test_a_block_is_held_until_every_medium_dropped_it():
    index = KVIndex()
    index.apply(P0, decoded(stored([1, 2]), stored([1], medium="CPU")))
    index.apply(P0, decoded(removed([1, 2])))  # evicted from the engine's cache
    assert index.cached_blocks(P0, [1, 2]) == 1  # block 1 is still in the CPU tier
    index.apply(P0, decoded(removed([1], medium="CPU")))
    assert index.size(P0) == 0


def test_hashes_as_bytes_are_the_same_blocks_as_their_low_64_bits():
    digest = bytes(range(32))
    index = KVIndex()
    index.stored(P0, [digest])
    assert index.cached_blocks(P0, [external_hash(digest)]) == 1
    assert external_hash(digest) == int.from_bytes(digest[-8:], "big")


def test_memory_is_bounded_oldest_entries_go_first():
    index = KVIndex(max_blocks_per_instance=3)
    index.stored(P0, [1, 2, 3])
    index.stored(P0, [1])  # stored again: newest
    index.stored(P0, [4, 5])
    assert index.size(P0) == 3 and index.evicted_for_space == 2
    assert [index.cached_blocks(P0, [h]) for h in (1, 2, 3, 4, 5)] == [1, 0, 0, 1, 1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_expected_blocks_count_as_held_until_stored_or_lapsed():
    clock = Clock()
    index = KVIndex(clock=clock)
    index.stored(P0, [1], block_size=4)
    index.expect(P0, [1, 2, 3], ttl_s=5.0)
    assert index.cached_blocks(P0, [1, 2, 3, 4]) == 3
    assert index.size(P0) == 1  # expected blocks are not entries held
    index.stored(P0, [2])  # its event came: held for good, no longer an expectation
    clock.now = 6.0
    assert index.cached_blocks(P0, [1, 2, 3]) == 2  # 3 lapsed
    index.expect(P0, [3], ttl_s=5.0)
    index.cleared(P0)
    assert index.cached_blocks(P0, [1, 2, 3]) == 0
    index.expect(P0, [7], ttl_s=0)  # 0: expectations off
    assert index.cached_blocks(P0, [7]) == 0


def test_expectations_are_bounded_and_lapsed_ones_are_forgotten():
    clock = Clock()
    index = KVIndex(max_blocks_per_instance=3, clock=clock)
    index.expect(P0, [1, 2, 3, 4], ttl_s=5.0)  # the oldest goes past the bound
    assert index.cached_blocks(P0, [2, 3, 4]) == 3 and index.cached_blocks(P0, [1]) == 0
    clock.now = 10.0
    index.expect(P0, [9], ttl_s=5.0)
    assert len(index._held[P0].expected) == 1  # the lapsed ones went first


def test_dropping_an_instance_forgets_only_it():
    index = KVIndex()
    index.stored(P0, [1])
    index.stored("pd-prefill-1", [1])
    index.drop(P0)
    assert index.cached_blocks(P0, [1]) == 0 and index.cached_blocks("pd-prefill-1", [1]) == 1


def test_other_kv_cache_groups_are_ignored():
    index = KVIndex()
    event = stored([5])
    event.group_idx = 1
    index.apply(P0, decoded(event))
    assert index.size(P0) == 0


# --- block hashes ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize("seed", [None, "0", "12345"])
def test_block_hashes_equal_vllms(algorithm, seed, monkeypatch):
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    hash_fn = get_hash_fn_by_name(algorithm)
    kv_cache_utils.init_none_hash(hash_fn)
    rng = random.Random(7)
    tokens = [rng.randrange(128_256) for _ in range(3 * 32 + 5)]  # a partial block at the end
    for salt in (None, "tenant-a"):
        expected, parent = [], None
        for start in range(0, len(tokens) - 31, 32):
            extra = (("cache_salt", salt),) if salt and start == 0 else None
            parent = kv_cache_utils.hash_block_tokens(
                hash_fn, parent, tokens[start : start + 32], extra
            )
            expected.append(parent)
        ours = BlockHasher(32, algorithm, os.environ.get("PYTHONHASHSEED"))
        assert ours.digests(tokens, salt) == expected
        for _ in range(2):  # computed, then from the blocks it remembers
            assert ours.hashes(tokens, salt) == [
                kv_cache_utils.maybe_convert_block_hash(h) for h in expected
            ]
        # A prompt sharing the first two blocks: their remembered hashes, then new ones.
        other = tokens[:64] + [rng.randrange(128_256) for _ in range(40)]
        parent, chain = expected[1], expected[:2]
        extra = None
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, other[64:96], extra)
        assert ours.digests(other, salt) == [*chain, parent]
    small = BlockHasher(32, algorithm, os.environ.get("PYTHONHASHSEED"), cache_blocks=2)
    assert (
        small.hashes(tokens)
        == small.hashes(tokens)
        == BlockHasher(32, algorithm, os.environ.get("PYTHONHASHSEED")).hashes(tokens)
    )
    assert ours.first_block(tokens[:32]) == ours.hashes(tokens)[0]


def test_an_algorithm_the_proxy_cannot_reproduce_is_refused():
    with pytest.raises(ValueError, match="'xxhash' cannot be reproduced"):
        BlockHasher(32, "xxhash")


# --- feeds over real sockets ---------------------------------------------------------------


class ScriptedPublisher:
    """vLLM's wire protocol on loopback TCP, with the test choosing what is sent live:
    every batch goes into the replay buffer; ``publish(..., live=False)`` loses it."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.pub = context.socket(zmq.PUB)
        self.router = context.socket(zmq.ROUTER)
        pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoints = EventEndpoints(
            f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}"
        )
        self.buffer: list[tuple[int, bytes]] = []
        self.replays: list[int] = []  # the start seq of each replay asked for
        self.answer_replays = True
        self._server = asyncio.ensure_future(self._serve_replays())

    async def publish(self, seq: int, *events: Any, live: bool = True) -> None:
        payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))
        self.buffer.append((seq, payload))
        if live:
            await self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    async def _serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replays.append(first)
            if not self.answer_replays:
                continue
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart(
                        [client, b"", b"", seq.to_bytes(8, "big"), payload]
                    )
            await self.router.send_multipart(
                [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
            )

    def close(self) -> None:
        self._server.cancel()
        self.pub.close(0)
        self.router.close(0)


@asynccontextmanager
async def feed_of(**kwargs: Any) -> AsyncIterator[tuple[ScriptedPublisher, EventFeed, KVIndex]]:
    context = zmq.asyncio.Context()
    publisher = ScriptedPublisher(context)
    index = KVIndex()
    feed = EventFeed(P0, publisher.endpoints, index, context, replay_timeout_s=1.0, **kwargs)
    task = asyncio.ensure_future(feed.run())
    try:
        await until(lambda: publisher.replays == [0])  # caught up at start
        await asyncio.sleep(0.2)  # the subscription travels to the publisher
        yield publisher, feed, index
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        publisher.close()
        context.term()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_events_in_order_are_applied():
    async def test() -> None:
        async with feed_of() as (pub, feed, index):
            await pub.publish(0, stored([1, 2]))
            await pub.publish(1, removed([2]), stored([3], parent=1))
            await until(lambda: feed.stats.batches == 2)
            assert index.cached_blocks(P0, [1, 3]) == 2 and index.cached_blocks(P0, [1, 2]) == 1
            assert pub.replays == [0] and feed.stats.gaps == 0

    run(test)


def test_a_lost_batch_is_replayed_and_applied_in_order():
    async def test() -> None:
        async with feed_of() as (pub, feed, index):
            await pub.publish(0, stored([1]))
            await pub.publish(1, stored([2]), live=False)  # lost on the way
            await pub.publish(2, removed([2]))
            await until(lambda: feed.stats.batches == 3)
            assert pub.replays == [0, 1]  # asked from the first one missing
            assert index.cached_blocks(P0, [1]) == 1 and index.cached_blocks(P0, [2]) == 0
            await pub.publish(3, stored([4]))  # live again; nothing applied twice
            await until(lambda: feed.stats.batches == 4)
            assert (feed.stats.gaps, feed.stats.drops) == (1, 0)

    run(test)


def test_a_gap_the_replay_cannot_fill_drops_the_instance_then_goes_on():
    async def test() -> None:
        async with feed_of() as (pub, feed, index):
            await pub.publish(0, stored([1]))
            await until(lambda: feed.stats.batches == 1)
            pub.answer_replays = False  # the replay buffer moved on / nobody answers
            await pub.publish(1, removed([1]), live=False)
            await pub.publish(2, stored([5]))
            await until(lambda: feed.stats.batches == 2)
            # Block 1's removal was lost: the entries are dropped rather than kept stale.
            assert index.cached_blocks(P0, [1]) == 0 and index.cached_blocks(P0, [5]) == 1
            assert feed.stats.drops == 1

    run(test)


def test_a_sequence_counting_from_zero_again_is_a_restart():
    async def test() -> None:
        async with feed_of() as (pub, feed, index):
            for seq in range(3):
                await pub.publish(seq, stored([10 + seq]))
            await until(lambda: feed.stats.batches == 3)
            pub.buffer.clear()  # a new engine: a new publisher, an empty buffer
            await pub.publish(0, stored([99]))
            await until(lambda: feed.stats.batches == 4)
            assert index.cached_blocks(P0, [10]) == 0 and index.cached_blocks(P0, [99]) == 1

    run(test)


def test_duplicated_and_reordered_batches_cost_misses_only():
    async def test() -> None:
        async with feed_of() as (pub, feed, index):
            await pub.publish(0, stored([1]))
            await pub.publish(2, stored([3]), live=False)
            await pub.publish(1, stored([2]))  # 2 is known from the buffer: replay fills it
            await until(lambda: feed.stats.batches == 2)
            await pub.pub.send_multipart([b"", (1).to_bytes(8, "big"), pub.buffer[2][1]])
            await pub.pub.send_multipart([b"", (2).to_bytes(8, "big"), pub.buffer[1][1]])
            await until(lambda: feed.stats.batches >= 3)
            await pub.publish(3, stored([4]))
            await until(lambda: index.cached_blocks(P0, [4]) == 1)
            # Whatever was dropped on the way, nothing is claimed that was never stored.
            for h in range(5, 50):
                assert index.cached_blocks(P0, [h]) == 0

    run(test)


def test_a_first_block_hashed_differently_is_reported():
    hasher = BlockHasher(4)
    tokens = [1, 2, 3, 4]

    async def test() -> None:
        async with feed_of(hasher_for=lambda size: BlockHasher(size)) as (pub, feed, _):
            await pub.publish(0, stored([hasher.first_block(tokens)], tokens=tokens))
            await until(lambda: feed.stats.batches == 1)
            assert feed.stats.hash_mismatches == 0
            pub.buffer.clear()  # a new engine, checked again; this one has another seed
            feed.reset()
            other = BlockHasher(4, seed="x").first_block(tokens)
            await pub.publish(0, stored([other], tokens=tokens))
            await until(lambda: feed.stats.batches == 2)
            assert feed.stats.hash_mismatches == 1

    run(test)


def test_vllms_own_publisher_is_read_with_what_it_sent_before_the_feed_started(tmp_path):
    """vLLM's ZmqEventPublisher (ipc sockets, as pd-serve configures a local cluster):
    batches published before the proxy subscribed come from its replay socket."""

    async def test() -> None:
        ends = EventEndpoints(f"ipc://{tmp_path}/ev.pub", f"ipc://{tmp_path}/ev.replay")
        publisher = ZmqEventPublisher(0, endpoint=ends.publisher, replay_endpoint=ends.replay)
        try:
            publisher.publish(KVEventBatch(ts=0.0, events=[stored([1, 2])]))
            await asyncio.sleep(0.3)  # sent while nobody listened
            index = KVIndex()
            pool = InstancePool([Instance(P0, "prefill", url="http://127.0.0.1:1", healthy=True)],
                                http=None)  # type: ignore[arg-type]  # fmt: skip
            feeds = EventFeeds({P0: ends}, index, replay_timeout_s=2.0)
            runner = asyncio.ensure_future(feeds.run(pool))
            await until(lambda: index.cached_blocks(P0, [1, 2]) == 2)
            publisher.publish(KVEventBatch(ts=0.0, events=[removed([2]), stored([7])]))
            await until(lambda: index.cached_blocks(P0, [7]) == 1)
            assert index.cached_blocks(P0, [1, 2]) == 1
            # Out of rotation: its entries go; back in, they come back from the replay.
            pool.instances[P0].healthy = False
            await until(lambda: index.size(P0) == 0)
            pool.instances[P0].healthy = True
            publisher.publish(KVEventBatch(ts=0.0, events=[stored([8])]))
            await until(lambda: index.cached_blocks(P0, [1]) == 1 and index.size(P0) == 3)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        finally:
            publisher.shutdown()

    run(test)


def test_a_wildcard_endpoint_is_reached_at_the_instances_host():
    assert connect_address("tcp://*:5557", "http://10.1.2.3:8100") == "tcp://10.1.2.3:5557"
    assert connect_address("ipc:///tmp/x.pub", "http://10.1.2.3:8100") == "ipc:///tmp/x.pub"
