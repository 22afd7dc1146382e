"""Counters of one store tier, and the plain snapshots they export.

A tier counts into a ``TierCounters`` while holding its own lock; ``snapshot()``
returns a frozen ``TierStats`` the connector can log, aggregate or export to
Prometheus. Hits and misses are in blocks: the caller multiplies by its block size
to report tokens. ``LatencyHistogram`` counts how long one block's get or put takes in
each tier (``StoreStats.latency``).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TierStats:
    """One tier at one moment. Counters grow from the tier's start; usage is current."""

    tier: str
    capacity_bytes: int
    usage_bytes: int = 0
    entries: int = 0
    hits: int = 0  # get() calls that returned a block
    misses: int = 0  # get() calls that returned None
    puts: int = 0  # blocks accepted by put()
    bytes_stored: int = 0
    bytes_loaded: int = 0
    evictions: int = 0  # entries dropped to make room
    evicted_bytes: int = 0
    refused_puts: int = 0  # blocks larger than the whole tier
    failed_writes: int = 0  # writes that failed (disk full, read-only, I/O error)
    corrupt_dropped: int = 0  # torn, truncated or corrupt entries found and removed
    recovered_entries: int = 0  # entries found on disk at start-up
    warnings: dict[str, int] = field(default_factory=dict)  # kind -> count


@dataclass
class TierCounters:
    """The mutable side of ``TierStats``; the owning tier serialises access."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_stored: int = 0
    bytes_loaded: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    refused_puts: int = 0
    failed_writes: int = 0
    corrupt_dropped: int = 0
    recovered_entries: int = 0
    warnings: dict[str, int] = field(default_factory=dict)

    def snapshot(self, tier: str, capacity_bytes: int, usage_bytes: int, entries: int) -> TierStats:
        return TierStats(
            tier=tier,
            capacity_bytes=capacity_bytes,
            usage_bytes=usage_bytes,
            entries=entries,
            hits=self.hits,
            misses=self.misses,
            puts=self.puts,
            bytes_stored=self.bytes_stored,
            bytes_loaded=self.bytes_loaded,
            evictions=self.evictions,
            evicted_bytes=self.evicted_bytes,
            refused_puts=self.refused_puts,
            failed_writes=self.failed_writes,
            corrupt_dropped=self.corrupt_dropped,
            recovered_entries=self.recovered_entries,
            warnings=dict(self.warnings),
        )


# Upper bounds (seconds) of one block's get or put in a tier: host copies take
# microseconds, disk reads and writes of a large block tens of milliseconds.
TIER_LATENCY_BUCKETS_S = (
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSnapshot:
    """A latency histogram at one moment; ``counts[i]`` holds the samples in bucket i
    alone (not cumulative), the last one those above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, samples at or below it)``, ending with ``(inf, count)``."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class LatencyHistogram:
    """Fixed-bucket latency counts; the owner serialises access."""

    def __init__(self, bounds: tuple[float, ...] = TIER_LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._sum)


@dataclass(frozen=True)
class StoreStats:
    """A ``TieredStore`` at one moment: its tiers plus what only the store sees."""

    host: TierStats | None
    disk: TierStats | None
    lookups: int = 0  # lookup_prefix() calls
    lookup_blocks: int = 0  # blocks asked about
    lookup_host_blocks: int = 0  # leading blocks found in the host tier
    lookup_disk_blocks: int = 0  # leading blocks found only on disk
    promotions: int = 0  # disk hits copied up into the host tier
    readahead_blocks: int = 0  # disk-only blocks of a lookup's hit hinted into page cache
    # "<tier>_get" / "<tier>_put" -> one block's get or put in that tier, hit or miss
    latency: dict[str, HistogramSnapshot] = field(default_factory=dict)


class WarningLimiter:
    """Counts warnings by kind and logs each kind at most once per ``interval_s``.

    A full or read-only disk fails every write; one line per kind per interval (with
    how many were suppressed) says so without flooding the log.
    """

    def __init__(
        self, logger: logging.Logger, counts: dict[str, int], interval_s: float = 60.0
    ) -> None:
        self._logger = logger
        self._counts = counts
        self._interval_s = interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        """Count one ``kind`` and maybe log ``message``. The caller holds the tier's lock."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < self._interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        tail = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.warning("%s: %s%s", kind, message, tail)
        self._last_logged[kind] = now
