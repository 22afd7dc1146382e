"""The host-memory tier: LRU under a byte cap, counted."""

from __future__ import annotations

from pd.store import HostTier
from tests.store_helpers import keys, payload


def test_lru_eviction_keeps_the_tier_within_its_size() -> None:
    tier = HostTier(capacity_bytes=3500)
    ks = keys(10)
    for k in ks[:3]:
        assert tier.put(k, payload(k))
    assert tier.get(ks[0]) == payload(ks[0])  # now the most recently used
    assert tier.put(ks[3], payload(ks[3]))  # evicts ks[1], the least recently used
    assert not tier.contains(ks[1])
    assert [tier.contains(k) for k in (ks[0], ks[2], ks[3])] == [True, True, True]
    for k in ks[4:]:
        tier.put(k, payload(k))
        assert tier.usage_bytes() <= 3500
    s = tier.stats()
    assert s.usage_bytes == 3000 and s.entries == 3
    assert s.evictions == 7 and s.evicted_bytes == 7000
    assert s.puts == 10 and s.bytes_stored == 10_000
    assert s.hits == 1 and s.bytes_loaded == 1000


def test_an_entry_larger_than_the_tier_is_refused_and_counted() -> None:
    tier = HostTier(capacity_bytes=999)
    k = keys(1)[0]
    assert not tier.put(k, payload(k))
    assert tier.get(k) is None
    s = tier.stats()
    assert (s.refused_puts, s.entries, s.misses, s.evictions) == (1, 0, 1, 0)
    assert not HostTier(0).put(k, b"x")


def test_a_stored_key_is_refreshed_not_counted_twice() -> None:
    tier = HostTier(capacity_bytes=10_000)
    k = keys(1)[0]
    assert tier.put(k, payload(k))
    assert tier.put(k, payload(k))
    s = tier.stats()
    assert (s.puts, s.usage_bytes, s.entries) == (1, 1000, 1)


def test_a_put_copies_so_later_writes_to_the_source_do_not_leak_in() -> None:
    tier = HostTier(capacity_bytes=10_000)
    k = keys(1)[0]
    source = bytearray(payload(k))
    tier.put(k, memoryview(source))
    source[:] = bytes(len(source))
    assert tier.get(k) == payload(k)


def test_evict_removes_one_entry() -> None:
    tier = HostTier(capacity_bytes=10_000)
    k = keys(1)[0]
    tier.put(k, payload(k))
    assert tier.evict(k) and not tier.evict(k)
    assert tier.usage_bytes() == 0 and tier.get(k) is None
    assert tier.lookup_prefix([k]) == 0


def test_put_copies_unless_the_buffer_is_handed_over() -> None:
    tier = HostTier(capacity_bytes=10_000)
    copied, kept = keys(2)
    source = bytearray(payload(copied))
    assert tier.put(copied, source)
    source[0] ^= 0xFF  # the caller's buffer changes (a KV cache block reused)
    assert tier.get(copied) == payload(copied)
    handed = bytearray(payload(kept))
    assert tier.put(kept, memoryview(handed), owned=True)
    got = tier.get(kept)
    assert isinstance(got, memoryview) and got.readonly and got.obj is handed  # no copy
    assert got == payload(kept) and tier.stats().bytes_stored == 2000
