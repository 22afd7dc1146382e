"""The node's store as its callers see it: a host-memory tier over a disk tier.

- ``lookup_prefix`` (scheduler side, once per request): how many leading blocks
  are stored, and in which tier, without reading them.
- ``get_many`` (worker side, the blocks of one load): host first, else disk; a
  disk hit is copied up into the host tier (promotion), so the next load of it is
  from memory. A load's disk reads run on ``disk_readers`` threads at once (reads
  and checksums release the GIL): 16 cold 1 MiB blocks took 22 ms one after another
  and 13-15 ms on 4 threads here, where the engine waits idle for the load.
- ``readahead`` (right after a lookup found blocks on disk only): the disk tier
  starts reading them into the page cache, so the load that follows, one or more
  engine steps later, finds most of them in memory.
- ``put`` (a saver thread, per block saved): into the host tier and written
  through to disk in the same call. Write-through, not write-back on host
  eviction: a crash or restart loses nothing already saved, and the host tier's
  eviction stays a dictionary pop, never a disk write on the loading path. The cost
  is one disk write per saved block, paid on the saver thread.

Either tier may be absent (``host_gib: 0``, ``disk_path: null``). Nothing here
raises for a miss, a corrupt entry or a failed write: the caller recomputes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pd.store.disk import DiskTier
from pd.store.host import HostTier
from pd.store.keys import BlockKey, StoreNamespace
from pd.store.stats import LatencyHistogram, StoreStats
from pd.store.tier import Payload

logger = logging.getLogger(__name__)

DISK_READERS = 4  # a load's disk reads in flight at once


@dataclass(frozen=True)
class PrefixHit:
    """The leading stored blocks, counted by the tier a load reads each from.

    A block in both tiers counts as host. The split is what a load will read from
    where, were nothing evicted meanwhile (a block evicted before its load is a
    failed load: vLLM recomputes it).
    """

    host_blocks: int = 0
    disk_blocks: int = 0

    @property
    def num_blocks(self) -> int:
        return self.host_blocks + self.disk_blocks


class TieredStore:
    """Host tier over disk tier, for any number of namespaces (keys carry theirs)."""

    def __init__(
        self, host: HostTier | None, disk: DiskTier | None, disk_readers: int = DISK_READERS
    ) -> None:
        if disk_readers < 1:
            raise ValueError(f"disk_readers must be >= 1, got {disk_readers}")
        self.host = host
        self.disk = disk
        self._readers = (
            ThreadPoolExecutor(disk_readers, thread_name_prefix="store-disk-read")
            if disk is not None and disk_readers > 1
            else None
        )
        self._lock = threading.Lock()
        self._lookups = 0
        self._lookup_blocks = 0
        self._lookup_host_blocks = 0
        self._lookup_disk_blocks = 0
        self._promotions = 0
        self._readahead_blocks = 0
        self._latency = {
            f"{tier}_{op}": LatencyHistogram()
            for tier, present in (("host", host), ("disk", disk))
            if present is not None
            for op in ("get", "put")
        }

    def open(self) -> None:
        """Open the disk tier (rebuilding its index) and log what the store holds."""
        if self.disk is not None:
            self.disk.open()
        logger.info("KV store: %s", self.describe())

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    def describe(self) -> str:
        """One line: each tier's size and, for disk, what was recovered at open."""
        parts = []
        if self.host is not None:
            parts.append(f"host {_gib(self.host.capacity_bytes)}")
        if self.disk is not None:
            s = self.disk.stats()
            parts.append(
                f"disk {_gib(s.capacity_bytes)} at {self.disk.root} "
                f"(recovered {s.entries} entries, {_gib(s.usage_bytes)}; "
                f"{self.disk.temp_files_removed} temp files removed)"
            )
        return ", ".join(parts) or "no tiers (disabled)"

    def register_namespace(self, namespace: StoreNamespace) -> None:
        if self.disk is not None:
            self.disk.register_namespace(namespace)

    def lookup_prefix(self, keys: Sequence[BlockKey]) -> PrefixHit:
        host_blocks = disk_blocks = 0
        for key in keys:
            if self.host is not None and self.host.contains(key):
                host_blocks += 1
            elif self.disk is not None and self.disk.contains(key):
                disk_blocks += 1
            else:
                break
        with self._lock:
            self._lookups += 1
            self._lookup_blocks += len(keys)
            self._lookup_host_blocks += host_blocks
            self._lookup_disk_blocks += disk_blocks
        return PrefixHit(host_blocks, disk_blocks)

    def readahead(self, keys: Sequence[BlockKey]) -> int:
        """Hint the disk tier to read those of ``keys`` the host tier lacks; how many
        it hinted."""
        if self.disk is None:
            return 0
        on_disk_only = [k for k in keys if self.host is None or not self.host.contains(k)]
        hinted = self.disk.readahead(on_disk_only) if on_disk_only else 0
        with self._lock:
            self._readahead_blocks += hinted
        return hinted

    def contains(self, key: BlockKey) -> bool:
        return (self.host is not None and self.host.contains(key)) or (
            self.disk is not None and self.disk.contains(key)
        )

    def get(self, key: BlockKey) -> bytes | memoryview | None:
        data = self._get_from_host(key)
        return data if data is not None else self._get_from_disk(key)

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | memoryview | None]:
        """Each key's bytes or ``None``, in order; what the host tier lacks is read from
        disk on several threads at once."""
        found = [self._get_from_host(key) for key in keys]
        missing = [i for i, data in enumerate(found) if data is None]
        if self.disk is None or not missing:
            return found
        if self._readers is None or len(missing) == 1:
            read = [self._get_from_disk(keys[i]) for i in missing]
        else:
            read = list(self._readers.map(self._get_from_disk, [keys[i] for i in missing]))
        for i, data in zip(missing, read, strict=True):
            found[i] = data
        return found

    def _get_from_host(self, key: BlockKey) -> bytes | memoryview | None:
        if self.host is None:
            return None
        started = time.perf_counter()
        data = self.host.get(key)
        self._observe("host_get", started)
        return data

    def _get_from_disk(self, key: BlockKey) -> bytes | memoryview | None:
        if self.disk is None:
            return None
        started = time.perf_counter()
        data = self.disk.get(key)
        self._observe("disk_get", started)
        if data is not None and self.host is not None and self.host.put(key, data, owned=True):
            with self._lock:
                self._promotions += 1
        return data

    def put(self, key: BlockKey, data: Payload, owned: bool = False) -> bool:
        """Store in every tier; True when at least one tier holds the block.

        ``owned``: ``data`` is handed over, never changed after (``HostTier.put``)."""
        stored = False
        if self.host is not None:
            started = time.perf_counter()
            stored = self.host.put(key, data, owned)
            self._observe("host_put", started)
        if self.disk is not None:
            started = time.perf_counter()
            stored = self.disk.put(key, data) or stored
            self._observe("disk_put", started)
        return stored

    def _observe(self, name: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        with self._lock:
            self._latency[name].observe(elapsed)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                host=self.host.stats() if self.host is not None else None,
                disk=self.disk.stats() if self.disk is not None else None,
                lookups=self._lookups,
                lookup_blocks=self._lookup_blocks,
                lookup_host_blocks=self._lookup_host_blocks,
                lookup_disk_blocks=self._lookup_disk_blocks,
                promotions=self._promotions,
                readahead_blocks=self._readahead_blocks,
                latency={name: h.snapshot() for name, h in self._latency.items()},
            )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
