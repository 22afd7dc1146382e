"""The tiered store: host over disk, write-through, promotion, prefix lookups, threads."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pd.store import DiskTier, HostTier, PrefixHit, TieredStore
from pd.store.entry import HEADER
from pd.store.keys import BlockKey
from tests.store_helpers import bytes_under, keys, payload

ENTRY_NBYTES = HEADER.size + 32 + 1000


def make_store(root: Path, host_blocks: int = 4, disk_blocks: int = 20) -> TieredStore:
    store = TieredStore(
        HostTier(capacity_bytes=host_blocks * 1000),
        DiskTier(root, capacity_bytes=disk_blocks * ENTRY_NBYTES),
    )
    store.open()
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    s = make_store(tmp_path / "store")
    yield s
    s.close()


def test_put_writes_through_to_both_tiers(store: TieredStore) -> None:
    k = keys(1)[0]
    assert store.put(k, payload(k))
    assert store.host is not None and store.disk is not None
    assert store.host.contains(k) and store.disk.contains(k)
    assert store.get(k) == payload(k)
    s = store.stats()
    assert s.host is not None and s.disk is not None
    assert (s.host.hits, s.disk.hits, s.disk.puts) == (1, 0, 1)


def test_lookup_prefix_stops_at_the_first_missing_block(store: TieredStore) -> None:
    ks = keys(10)
    for i, k in enumerate(ks):
        if i != 6:
            store.put(k, payload(k))
    # The host tier holds the last 4 stored (5, 7, 8, 9); the rest are on disk only.
    hit = store.lookup_prefix(ks)
    assert hit == PrefixHit(host_blocks=1, disk_blocks=5) and hit.num_blocks == 6
    assert store.lookup_prefix(ks[7:]) == PrefixHit(host_blocks=3, disk_blocks=0)
    assert store.lookup_prefix(keys(3, seed="other")) == PrefixHit()
    assert store.lookup_prefix([]) == PrefixHit()
    s = store.stats()
    assert (s.lookups, s.lookup_blocks, s.lookup_host_blocks, s.lookup_disk_blocks) == (
        4,
        16,
        4,
        5,
    )
    assert s.host is not None and s.host.hits == 0  # lookups read nothing


def test_a_disk_hit_is_promoted_to_the_host_tier(store: TieredStore) -> None:
    ks = keys(6)
    for k in ks:
        store.put(k, payload(k))
    assert store.host is not None
    assert not store.host.contains(ks[0])
    assert store.get(ks[0]) == payload(ks[0])
    assert store.host.contains(ks[0])
    assert store.get(ks[0]) == payload(ks[0])
    s = store.stats()
    assert s.host is not None and s.disk is not None
    assert (s.promotions, s.disk.hits, s.host.hits, s.host.misses) == (1, 1, 1, 1)


def test_a_restart_serves_the_same_bytes_from_disk(tmp_path: Path) -> None:
    ks = keys(8)
    first = make_store(tmp_path / "store")
    for k in ks:
        first.put(k, payload(k))
    first.close()

    second = make_store(tmp_path / "store")
    try:
        assert second.lookup_prefix(ks) == PrefixHit(host_blocks=0, disk_blocks=8)
        assert [second.get(k) for k in ks] == [payload(k) for k in ks]
        assert "recovered 8 entries" in second.describe()
    finally:
        second.close()


def test_a_store_full_of_blocks_stays_within_each_tier(store: TieredStore) -> None:
    ks = keys(100)
    rng = random.Random(0)
    for k in ks:
        store.put(k, payload(k))
        if rng.random() < 0.3:
            store.get(rng.choice(ks))
    assert store.host is not None and store.disk is not None
    assert store.host.usage_bytes() <= store.host.capacity_bytes
    assert bytes_under(store.disk.root) == store.disk.usage_bytes() <= store.disk.capacity_bytes
    assert store.lookup_prefix(ks[-4:]).num_blocks == 4


def test_either_tier_may_be_absent(tmp_path: Path) -> None:
    k = keys(1)[0]
    host_only = TieredStore(HostTier(10_000), None)
    host_only.open()
    assert host_only.put(k, payload(k)) and host_only.get(k) == payload(k)
    assert host_only.stats().disk is None

    disk_only = TieredStore(None, DiskTier(tmp_path, 10**6))
    disk_only.open()
    assert disk_only.put(k, payload(k))
    assert disk_only.lookup_prefix([k]) == PrefixHit(0, 1)
    assert disk_only.get(k) == payload(k)
    disk_only.close()

    neither = TieredStore(None, None)
    assert not neither.put(k, payload(k)) and neither.get(k) is None
    assert neither.describe() == "no tiers (disabled)"


def test_open_logs_one_line_with_sizes_and_what_was_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pd.store.tiered"):
        s = make_store(tmp_path)
    s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pd.store.tiered"]
    assert len(lines) == 1
    assert "host 0.00 GiB" in lines[0] and "recovered 0 entries" in lines[0]


def test_concurrent_puts_and_gets_return_only_the_right_bytes(tmp_path: Path) -> None:
    """A saver thread and workers at once, with evictions happening all the time."""
    store = make_store(tmp_path / "store", host_blocks=8, disk_blocks=24)
    ks = keys(64)
    errors: list[BaseException] = []
    wrong: list[int] = []
    found = [0]
    start = threading.Barrier(6)
    savers_left = [2]
    savers_lock = threading.Lock()

    def saver(offset: int) -> None:
        start.wait()
        try:
            for i in range(300):
                k = ks[(i * 7 + offset) % len(ks)]
                store.put(k, payload(k))
        finally:
            with savers_lock:
                savers_left[0] -= 1

    def loader(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        rounds = 0
        # Load for as long as the savers save (however the threads are scheduled),
        # so the gets overlap the puts and evictions instead of racing past them.
        while rounds < 400 or savers_left[0] > 0:
            rounds += 1
            i = rng.randrange(len(ks))
            data = store.get(ks[i])
            if data is not None:
                found[0] += 1
                if data != payload(ks[i]):
                    wrong.append(i)
            store.lookup_prefix(ks[i : i + 4])

    def run(target: object, arg: int) -> None:
        try:
            target(arg)  # type: ignore[operator]
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(saver, n)) for n in range(2)]
    threads += [threading.Thread(target=run, args=(loader, n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and wrong == []
    assert found[0] > 0
    s = store.stats()
    assert s.host is not None and s.disk is not None
    assert s.host.usage_bytes <= s.host.capacity_bytes
    assert s.disk.usage_bytes <= s.disk.capacity_bytes
    assert s.disk.corrupt_dropped == 0 and s.disk.failed_writes == 0
    assert store.disk is not None
    assert bytes_under(store.disk.root) == s.disk.usage_bytes
    assert list(store.disk.root.rglob("*.tmp")) == []
    store.close()


def test_get_many_reads_host_then_disk_in_order_and_promotes(store: TieredStore) -> None:
    ks = keys(8)
    for i, k in enumerate(ks):
        if i != 3:
            store.put(k, payload(k))
    # The host tier holds the last 4 stored (4..7); 0-2 are on disk only; 3 nowhere.
    got = store.get_many(ks)
    assert got == [None if i == 3 else payload(k) for i, k in enumerate(ks)]
    s = store.stats()
    assert s.disk is not None and s.disk.hits == 3 and s.promotions == 3
    assert store.get_many([]) == []


class _RendezvousDisk(DiskTier):
    """A disk tier whose reads wait until ``parties`` of them are in flight at once."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root, capacity_bytes=10**6)
        self.barrier = threading.Barrier(parties, timeout=10)

    def get(self, key: BlockKey) -> bytes | None:
        self.barrier.wait()  # BrokenBarrierError (a failed test) if reads ran in turn
        return super().get(key)


def test_get_many_reads_disk_blocks_concurrently(tmp_path: Path) -> None:
    disk = _RendezvousDisk(tmp_path / "d", parties=4)
    store = TieredStore(None, disk, disk_readers=4)
    store.open()
    try:
        ks = keys(4)
        for k in ks:
            store.put(k, payload(k))
        assert store.get_many(ks) == [payload(k) for k in ks]
    finally:
        store.close()


def test_get_many_with_one_reader_reads_in_turn(tmp_path: Path) -> None:
    store = TieredStore(None, DiskTier(tmp_path / "d", 10**6), disk_readers=1)
    store.open()
    try:
        ks = keys(3)
        for k in ks:
            store.put(k, payload(k))
        assert store.get_many(ks) == [payload(k) for k in ks]
    finally:
        store.close()
    with pytest.raises(ValueError, match="disk_readers"):
        TieredStore(None, None, disk_readers=0)
