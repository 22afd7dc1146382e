"""LeaseTable: prefill-side holds on finished requests' KV blocks."""

from __future__ import annotations

from pd.transfer.lease import EndedLeases, LeaseTable


def test_grant_and_may_read() -> None:
    table = LeaseTable(lease_timeout_s=10)
    # Not granted yet: the scheduler already holds the blocks, the grant is on its way.
    assert table.may_read("r", [1]) is True
    table.grant("r", [1, 2, 3], now=0)
    assert len(table) == 1
    assert table.may_read("r", [1, 3]) is True
    assert table.may_read("r", []) is True
    assert table.may_read("r", [3, 4]) is False  # not this lease's blocks


def test_release_ends_lease_once_and_forbids_later_reads() -> None:
    table = LeaseTable(lease_timeout_s=10)
    table.grant("r", [1], now=0)
    assert table.release("r", now=1) is True
    assert len(table) == 0
    assert table.may_read("r", [1]) is False
    assert table.take_ended(now=2) == EndedLeases(released=["r"], expired=[])
    assert table.take_ended(now=3) == EndedLeases(released=[], expired=[])
    assert table.may_read("r", [1]) is False


def test_release_before_grant_applies_when_grant_arrives() -> None:
    table = LeaseTable(lease_timeout_s=10)
    assert table.release("r", now=0) is False
    assert table.may_read("r", [1]) is False  # released: the blocks are on their way out
    assert table.take_ended(now=1) == EndedLeases(released=[], expired=[])
    table.grant("r", [1, 2], now=2)
    assert len(table) == 0
    assert table.take_ended(now=3) == EndedLeases(released=["r"], expired=[])
    assert table.take_ended(now=4) == EndedLeases(released=[], expired=[])


def test_early_release_is_forgotten_after_one_lease_period() -> None:
    table = LeaseTable(lease_timeout_s=10)
    table.release("r", now=0)
    assert table.take_ended(now=11) == EndedLeases(released=[], expired=[])
    table.grant("r", [1], now=12)
    assert table.may_read("r", [1]) is True


def test_expiry_forbids_reads_for_the_memory_period() -> None:
    table = LeaseTable(lease_timeout_s=10, ended_memory_s=100)
    table.grant("a", [1], now=0)
    table.grant("b", [2], now=5)
    assert table.take_ended(now=9.9) == EndedLeases(released=[], expired=[])
    assert table.take_ended(now=10) == EndedLeases(released=[], expired=["a"])
    assert len(table) == 1
    assert table.may_read("a", [1]) is False  # its blocks may belong to another request
    assert table.release("a", now=11) is False  # already ended
    assert table.take_ended(now=20) == EndedLeases(released=[], expired=["b"])
    assert table.take_ended(now=30) == EndedLeases(released=[], expired=[])
    assert len(table) == 0
    table.take_ended(now=200)  # ended ids are forgotten after ended_memory_s
    assert table.may_read("a", [1]) is True


def test_released_and_expired_together() -> None:
    table = LeaseTable(lease_timeout_s=10)
    for rid in ("a", "b", "c"):
        table.grant(rid, [0], now=0)
    table.release("b", now=1)
    ended = table.take_ended(now=100)
    assert ended.released == ["b"]
    assert sorted(ended.expired) == ["a", "c"]
    assert len(table) == 0
