"""Host-memory tier: an LRU of block bytes under a byte cap (one ``OrderedDict``)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from pd.store.keys import BlockKey
from pd.store.stats import TierCounters, TierStats
from pd.store.tier import Payload, Tier


class HostTier(Tier):
    """Blocks in process memory, least recently used evicted first.

    Usage counts payload bytes only (Python's per-object overhead is small beside
    blocks of hundreds of KiB). A block larger than the whole tier is refused and
    counted, never stored by evicting everything.
    """

    name = "host"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"HostTier capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity_bytes = capacity_bytes
        self._entries: OrderedDict[BlockKey, bytes | memoryview] = OrderedDict()
        self._usage_bytes = 0
        self._counters = TierCounters()
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: BlockKey) -> bytes | memoryview | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self._counters.misses += 1
                return None
            self._entries.move_to_end(key)
            self._counters.hits += 1
            self._counters.bytes_loaded += len(data)
            return data

    def put(self, key: BlockKey, data: Payload, owned: bool = False) -> bool:
        """``owned``: the caller hands ``data`` over and never changes it (the store
        process's received ZMQ frame, a block just read from disk), so it is kept as a
        read-only view instead of copied (a copy of 16 MiB held the GIL ~35 ms here)."""
        nbytes = memoryview(data).nbytes
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            if nbytes > self._capacity_bytes:
                self._counters.refused_puts += 1
                return False
        # Copy outside the lock: ``data`` may be a view of the engine's KV cache.
        copy = memoryview(data).toreadonly().cast("B") if owned else bytes(data)
        with self._lock:
            if key in self._entries:  # another thread stored it meanwhile
                self._entries.move_to_end(key)
                return True
            while self._usage_bytes + nbytes > self._capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._usage_bytes -= len(evicted)
                self._counters.evictions += 1
                self._counters.evicted_bytes += len(evicted)
            self._entries[key] = copy
            self._usage_bytes += nbytes
            self._counters.puts += 1
            self._counters.bytes_stored += nbytes
            return True

    def evict(self, key: BlockKey) -> bool:
        with self._lock:
            data = self._entries.pop(key, None)
            if data is None:
                return False
            self._usage_bytes -= len(data)
            return True

    def usage_bytes(self) -> int:
        with self._lock:
            return self._usage_bytes

    def stats(self) -> TierStats:
        with self._lock:
            return self._counters.snapshot(
                self.name, self._capacity_bytes, self._usage_bytes, len(self._entries)
            )
