"""The interface every store tier implements (host memory, disk; later, remote).

Callers and how often:
- the connector's scheduler side calls ``lookup_prefix`` once per new request
  (through ``TieredStore``): it must be fast and must not touch the payloads;
- the worker side calls ``get`` for each block it loads and a saver thread calls
  ``put`` for each block it saves, concurrently: every method is thread-safe.

Failure behaviour: a tier never raises to its caller for a missing, corrupt or
unwritable entry. ``get`` returns ``None`` (a miss, so the block is recomputed),
``put`` returns ``False`` (not stored), and the tier counts what happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pd.store.keys import BlockKey
from pd.store.stats import TierStats

# What put() accepts: anything exposing a contiguous buffer (bytes, bytearray,
# memoryview, a contiguous numpy array). ``pd.store.blocks`` converts torch tensors.
Payload = bytes | bytearray | memoryview


class Tier(ABC):
    name: str

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether ``key`` is stored. Does not count a hit or refresh its recency."""

    def lookup_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many leading ``keys`` are stored (stops at the first missing one)."""
        for count, key in enumerate(keys):
            if not self.contains(key):
                return count
        return len(keys)

    @abstractmethod
    def get(self, key: BlockKey) -> bytes | memoryview | None:
        """The block's bytes (a read-only buffer) and make it most recently used, or
        ``None`` on a miss."""

    @abstractmethod
    def put(self, key: BlockKey, data: Payload) -> bool:
        """Store a copy of ``data`` under ``key``, evicting least recently used entries.

        Returns whether the block is stored when the call returns. A key already
        stored is only refreshed (equal keys name equal KV, so it is not rewritten).
        """

    @abstractmethod
    def evict(self, key: BlockKey) -> bool:
        """Drop ``key`` if stored; returns whether it was."""

    @abstractmethod
    def usage_bytes(self) -> int: ...

    @abstractmethod
    def stats(self) -> TierStats: ...
