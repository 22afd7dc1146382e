"""The disk tier: persistent, checksummed, LRU under a byte cap, never raising on I/O."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pd.store import DiskTier, DiskTierInUse
from pd.store.entry import HEADER, encode_entry
from tests.store_helpers import NAMESPACE, bytes_under, files_under, keys, namespace, payload

ENTRY_NBYTES = HEADER.size + 32 + 1000  # header, 32-byte block hash, 1000-byte payload


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskTier]:
    tier = DiskTier(tmp_path / "store", capacity_bytes=10 * ENTRY_NBYTES)
    tier.open()
    yield tier
    tier.close()


def reopen(tier: DiskTier, capacity_bytes: int | None = None) -> DiskTier:
    tier.close()
    again = DiskTier(tier.root, capacity_bytes or tier.capacity_bytes)
    again.open()
    return again


def test_an_entry_round_trips_through_its_file(disk: DiskTier) -> None:
    k = keys(1)[0]
    assert disk.get(k) is None
    assert disk.put(k, payload(k))
    assert disk.get(k) == payload(k)
    path = disk.path_of(k)
    assert path.is_file() and path.stat().st_size == ENTRY_NBYTES
    assert path.parent.parent.name == NAMESPACE.digest_hex
    s = disk.stats()
    assert (s.hits, s.misses, s.puts, s.entries) == (1, 1, 1, 1)
    assert (s.bytes_stored, s.bytes_loaded, s.usage_bytes) == (1000, 1000, ENTRY_NBYTES)


def test_lru_eviction_keeps_the_directory_within_its_size(disk: DiskTier) -> None:
    ks = keys(25)
    for i, k in enumerate(ks):
        assert disk.put(k, payload(k))
        if i >= 1:
            assert disk.get(ks[0]) == payload(ks[0])  # keep the first one hot
        assert bytes_under(disk.root) <= disk.capacity_bytes
        assert disk.usage_bytes() == bytes_under(disk.root)
    assert disk.contains(ks[0])
    assert [disk.contains(k) for k in ks[1:16]] == [False] * 15
    assert all(disk.contains(k) for k in ks[16:])
    s = disk.stats()
    assert (s.entries, s.evictions, s.evicted_bytes) == (10, 15, 15 * ENTRY_NBYTES)
    assert len(files_under(disk.root)) == 10


def test_a_restart_rebuilds_the_index_and_returns_the_same_bytes(disk: DiskTier) -> None:
    ks = keys(6)
    for k in ks:
        disk.put(k, payload(k))
    disk.register_namespace(NAMESPACE)
    # A crash in the middle of a write leaves a temp file beside the entries.
    leftover = disk.path_of(ks[0]).with_name("deadbeef.kv.123.0.tmp")
    leftover.write_bytes(b"half an entry")

    again = reopen(disk)
    try:
        s = again.stats()
        assert (s.recovered_entries, s.entries, s.usage_bytes) == (6, 6, 6 * ENTRY_NBYTES)
        assert again.temp_files_removed == 1 and not leftover.exists()
        assert again.lookup_prefix(ks) == 6
        assert [again.get(k) for k in ks] == [payload(k) for k in ks]
        manifest = again.root / NAMESPACE.digest_hex / "namespace.json"
        assert '"kv_dtype":"bfloat16"' in manifest.read_text()
    finally:
        again.close()


def test_files_that_are_not_entries_are_left_alone(disk: DiskTier) -> None:
    k = keys(1)[0]
    disk.put(k, payload(k))
    fan = disk.path_of(k).parent
    strangers = [
        disk.root / "README",
        disk.root / "not-hex" / "ab" / "cd.kv",
        fan / "notes.txt",
        fan / "odd.kv",
        fan / ("ab" * 65 + ".kv"),  # a 65-byte "hash": longer than any BlockKey
    ]
    for path in strangers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("someone else's")
    again = reopen(disk)
    try:
        assert again.stats().recovered_entries == 1
        assert all(path.exists() for path in strangers)
        assert again.get(k) == payload(k)
    finally:
        again.close()


def test_recency_survives_a_restart_and_a_smaller_cap_evicts_the_oldest(
    disk: DiskTier,
) -> None:
    ks = keys(4)
    for i, k in enumerate(ks):
        disk.put(k, payload(k))
        os.utime(disk.path_of(k), ns=(10**18 + i, 10**18 + i))
    os.utime(disk.path_of(ks[0]), ns=(2 * 10**18, 2 * 10**18))  # ks[0] used last
    again = reopen(disk, capacity_bytes=2 * ENTRY_NBYTES)
    try:
        assert [again.contains(k) for k in ks] == [True, False, False, True]
        assert again.stats().evictions == 2
        assert bytes_under(again.root) == 2 * ENTRY_NBYTES
    finally:
        again.close()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_payload_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(data)


def _flip_a_length_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[40] ^= 0x80  # the payload length's low byte
    path.write_bytes(data)


def _flip_a_namespace_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] ^= 0x01  # the namespace digest's first byte
    path.write_bytes(data)


def _flip_a_checksum_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER.size - 1] ^= 0x01
    path.write_bytes(data)


def _extended(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 4096)  # e.g. a file system replaying a journal


def _torn(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: HEADER.size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _torn,
        _extended,
        _flip_a_payload_bit,
        _flip_a_length_bit,
        _flip_a_namespace_bit,
        _flip_a_checksum_bit,
    ],
)
def test_a_damaged_entry_reads_as_a_miss_and_is_counted_and_removed(
    disk: DiskTier, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = keys(2)
    disk.put(good, payload(good))
    disk.put(bad, payload(bad))
    damage(disk.path_of(bad))
    with caplog.at_level(logging.WARNING, logger="pd.store.disk"):
        assert disk.get(bad) is None
    assert not disk.path_of(bad).exists() and not disk.contains(bad)
    assert disk.get(good) == payload(good)
    s = disk.stats()
    assert (s.corrupt_dropped, s.misses, s.hits, s.entries) == (1, 1, 1, 1)
    assert s.usage_bytes == ENTRY_NBYTES == bytes_under(disk.root)
    assert s.warnings == {"corrupt_entry": 1}
    assert logged(caplog, "corrupt_entry") == 1
    # It is recomputed and saved again.
    assert disk.put(bad, payload(bad)) and disk.get(bad) == payload(bad)


def test_an_entry_under_another_key_name_is_corrupt(disk: DiskTier) -> None:
    a, b = keys(2)
    disk.put(a, payload(a))
    disk.put(b, payload(b))
    os.replace(disk.path_of(a), disk.path_of(b))  # b's file now holds a's entry
    assert disk.get(b) is None
    assert disk.stats().corrupt_dropped == 1


def test_a_damaged_entry_found_after_a_restart_is_dropped_too(disk: DiskTier) -> None:
    k = keys(1)[0]
    disk.put(k, payload(k))
    _flip_a_payload_bit(disk.path_of(k))
    again = reopen(disk)
    try:
        assert again.contains(k)  # the scan reads names, not contents
        assert again.get(k) is None and again.stats().corrupt_dropped == 1
        assert files_under(again.root) == []
    finally:
        again.close()


@pytest.mark.parametrize(
    "change", [{"weights_id": "v" * 64}, {"kv_dtype": "float16"}, {"block_size": 32}]
)
def test_another_namespace_on_the_same_directory_gets_no_hits(
    disk: DiskTier, change: dict[str, Any]
) -> None:
    ks = keys(5)
    for k in ks:
        disk.put(k, payload(k))
    again = reopen(disk)
    try:
        same_hashes = namespace(**change).keys(k.block_hash for k in ks)
        assert again.lookup_prefix(same_hashes) == 0
        assert [again.get(k) for k in same_hashes] == [None] * 5
        assert again.stats().hits == 0
        assert again.lookup_prefix(ks) == 5  # the original namespace still hits
    finally:
        again.close()


def _refuse_creation(monkeypatch: pytest.MonkeyPatch, error: int, under: Path) -> None:
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(under)):
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_directory_serves_what_it_has_and_warns_once(
    disk: DiskTier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ks = keys(6)
    for k in ks[:3]:
        disk.put(k, payload(k))
    disk.close()
    _refuse_creation(monkeypatch, errno.EROFS, disk.root)
    monkeypatch.setattr(os, "unlink", _read_only_unlink)
    ro = DiskTier(disk.root, disk.capacity_bytes)
    with caplog.at_level(logging.WARNING, logger="pd.store.disk"):
        ro.open()  # locks the existing .lock read-only
        assert [ro.get(k) for k in ks[:3]] == [payload(k) for k in ks[:3]]
        assert [ro.put(k, payload(k)) for k in ks[3:]] == [False] * 3
        _flip_a_payload_bit_in_place(ro.path_of(ks[0]))
        assert ro.get(ks[0]) is None  # corrupt, and cannot even be deleted
    s = ro.stats()
    assert (s.failed_writes, s.hits, s.corrupt_dropped, s.entries) == (3, 3, 1, 2)
    assert s.warnings == {"read_only": 4, "corrupt_entry": 1}
    assert logged(caplog, "read_only") == 1  # rate-limited: three writes, one delete
    ro.close()


def _read_only_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def logged(caplog: pytest.LogCaptureFixture, kind: str) -> int:
    return sum(r.getMessage().startswith(f"{kind}:") for r in caplog.records)


def _flip_a_payload_bit_in_place(path: Path) -> None:
    with path.open("r+b") as f:  # no O_CREAT: allowed by the patched os.open
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))


def test_a_full_disk_is_a_counted_warning_and_leaves_no_temp_file(
    disk: DiskTier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
            self._file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    ks = keys(3)
    with caplog.at_level(logging.WARNING, logger="pd.store.disk"):
        assert [disk.put(k, payload(k)) for k in ks] == [False] * 3
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    s = disk.stats()
    assert (s.failed_writes, s.entries, s.usage_bytes) == (3, 0, 0)
    assert s.warnings == {"disk_full": 3}
    assert logged(caplog, "disk_full") == 1
    assert list(disk.root.rglob("*.tmp")) == [] and files_under(disk.root) == []
    # Space comes back: writes work again.
    assert disk.put(ks[0], payload(ks[0])) and disk.get(ks[0]) == payload(ks[0])


def test_a_directory_that_cannot_be_created_stores_nothing_and_raises_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("in the way")
    tier = DiskTier(tmp_path / "file" / "store", capacity_bytes=10**6)
    tier.open()
    k = keys(1)[0]
    assert not tier.put(k, payload(k)) and tier.get(k) is None
    s = tier.stats()
    assert s.failed_writes == 1 and sum(s.warnings.values()) == 2
    tier.close()


def test_one_process_owns_a_directory(disk: DiskTier) -> None:
    second = DiskTier(disk.root, capacity_bytes=10**6)
    with pytest.raises(DiskTierInUse):
        second.open()
    disk.close()
    second.open()
    second.close()


def test_an_entry_larger_than_the_tier_is_refused(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=ENTRY_NBYTES - 1)
    tier.open()
    k = keys(1)[0]
    assert not tier.put(k, payload(k))
    assert tier.stats().refused_puts == 1 and files_under(tmp_path) == []
    tier.close()


def test_using_a_tier_before_open_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="before open"):
        DiskTier(tmp_path, 10**6).get(keys(1)[0])


def test_the_header_names_the_format(disk: DiskTier) -> None:
    k = keys(1)[0]
    head, body = encode_entry(k, payload(k))
    magic, version, key_len, ns, payload_len, crc = HEADER.unpack(head[: HEADER.size])
    assert (magic, version, key_len, ns, payload_len) == (b"PDKV", 1, 32, k.namespace, 1000)
    assert head[HEADER.size :] == k.block_hash and bytes(body) == payload(k)
    assert HEADER.size == 52 and 0 <= crc < 2**32


def test_readahead_hints_stored_entries_only_and_counts_no_hit(disk: DiskTier) -> None:
    ks = keys(4)
    for k in ks[:3]:
        disk.put(k, payload(k))
    disk.path_of(ks[2]).unlink()  # deleted behind its back: skipped, not raised
    assert disk.readahead(ks) == 2
    s = disk.stats()
    assert (s.hits, s.misses) == (0, 0)
    assert disk.get(ks[0]) == payload(ks[0])  # the hint changes nothing read
