"""The cluster's KV, as the proxy knows it: which instance holds which blocks.

Fed by the instances' KV cache events (``pd.proxy.kv_events``): ``BlockStored``
adds a run of block hashes to the instance that sent it, ``BlockRemoved`` takes them
away, ``AllBlocksCleared`` empties it. A block is kept per medium (``GPU``: the
engine's own cache, whatever the device; ``CPU``/``STORAGE``: an offloading tier),
so removing it from one tier leaves it held in another.

What the index says is a hint, never a promise: an entry may be stale (an eviction
event not arrived yet) or missing (events lost, an instance restarted, the cap hit),
which costs a miss or a recompute, never a wrong answer. So it stays simple:
- memory is bounded: at most ``max_blocks_per_instance`` entries per instance; past
  it the longest-held entries go first (an approximation of the engine's LRU);
- ``drop`` forgets an instance (it restarted, left rotation, lost events);
- an unknown hash is simply not held; events for an unknown instance are ignored.

Between routing a prompt to an instance and that instance's ``BlockStored`` events
(the prompt computed, seconds later under load), the proxy may ``expect`` its blocks
there: they count as held until the events come or ``ttl_s`` passes, so a request that
follows (a conversation's next turn) goes where its prefix is being computed instead of
computing it again elsewhere. An expectation that never comes true costs a miss.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pd.proxy.block_hashing import external_hash

logger = logging.getLogger(__name__)

DEFAULT_MEDIUM = "GPU"  # vLLM's engine cache reports "GPU" on every platform
_MEDIA = {"GPU": 1, "CPU": 2, "STORAGE": 4}
_OTHER_MEDIUM = 8  # a tier the index does not know by name


def _bit(medium: str | None) -> int:
    return _MEDIA.get(medium or DEFAULT_MEDIUM, _OTHER_MEDIUM)


@dataclass
class HeldBlocks:
    """One instance's blocks: hash -> bitmask of the media holding it, oldest first."""

    blocks: OrderedDict[int, int] = field(default_factory=OrderedDict)
    block_size: int | None = None  # from its BlockStored events
    # Blocks routed here and not stored yet: hash -> when the expectation lapses, in
    # that order (one ttl for all: insertion order is expiry order).
    expected: dict[int, float] = field(default_factory=dict)


class KVIndex:
    def __init__(
        self, max_blocks_per_instance: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        if max_blocks_per_instance < 1:
            raise ValueError("max_blocks_per_instance must be positive")
        self.max_blocks_per_instance = max_blocks_per_instance
        self._clock = clock
        self._held: dict[str, HeldBlocks] = {}
        self.evicted_for_space = 0  # entries dropped because an instance hit the cap

    # --- events in -----------------------------------------------------------------------

    def stored(
        self, instance: str, block_hashes: Iterable[int | bytes], block_size: int = 0,
        medium: str | None = None,
    ) -> None:  # fmt: skip
        held = self._held.setdefault(instance, HeldBlocks())
        if block_size > 0:
            held.block_size = block_size
        bit = _bit(medium)
        blocks = held.blocks
        expected = held.expected
        for raw in block_hashes:
            h = external_hash(raw)
            blocks[h] = blocks.get(h, 0) | bit
            blocks.move_to_end(h)  # stored again: the newest entry
            if expected:
                expected.pop(h, None)  # it came true
        overflow = len(blocks) - self.max_blocks_per_instance
        for _ in range(max(0, overflow)):
            blocks.popitem(last=False)
        self.evicted_for_space += max(0, overflow)

    def expect(self, instance: str, block_hashes: Sequence[int], ttl_s: float) -> None:
        """``instance`` is about to compute these blocks (a prompt routed to it): they
        count as held for ``ttl_s`` or until it stores them. A block it holds already
        is left as it is; an instance the index has not heard of yet is remembered."""
        if ttl_s <= 0 or not block_hashes:
            return
        held = self._held.setdefault(instance, HeldBlocks())
        now = self._clock()
        expected = held.expected
        while expected:  # the lapsed ones first (the oldest are first)
            oldest = next(iter(expected))
            if expected[oldest] >= now:
                break
            del expected[oldest]
        until = now + ttl_s
        blocks = held.blocks
        for h in block_hashes:
            if h in blocks:
                continue
            expected.pop(h, None)  # re-inserted: at the end, in expiry order
            expected[h] = until
        overflow = len(expected) - self.max_blocks_per_instance
        for _ in range(max(0, overflow)):
            del expected[next(iter(expected))]

    def removed(
        self, instance: str, block_hashes: Iterable[int | bytes], medium: str | None = None
    ) -> None:
        held = self._held.get(instance)
        if held is None:
            return
        bit = _bit(medium)
        for raw in block_hashes:
            h = external_hash(raw)
            media = held.blocks.get(h)
            if media is None:
                continue  # never heard of it (a lost store event, or dropped): nothing to do
            if media & ~bit:
                held.blocks[h] = media & ~bit
            else:
                del held.blocks[h]

    def cleared(self, instance: str) -> None:
        """``AllBlocksCleared``: nothing is held any more (its block size stays known)."""
        held = self._held.get(instance)
        if held is not None:
            held.blocks.clear()
            held.expected.clear()

    def drop(self, instance: str) -> None:
        """Forget ``instance`` entirely (restarted, out of rotation, events lost)."""
        self._held.pop(instance, None)

    def apply(self, instance: str, events: Sequence[Any]) -> None:
        """One batch of decoded events (msgpack maps with a ``type``), in order."""
        for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if event.get("group_idx") not in (None, 0):
                continue  # another KV cache group (hybrid models): its hashes repeat group 0's
            if kind == "BlockStored":
                self.stored(
                    instance,
                    event.get("block_hashes") or (),
                    int(event.get("block_size") or 0),
                    event.get("medium"),
                )
            elif kind == "BlockRemoved":
                self.removed(instance, event.get("block_hashes") or (), event.get("medium"))
            elif kind == "AllBlocksCleared":
                self.cleared(instance)
            else:
                logger.debug("kv index: event of unknown type %r from %s ignored", kind, instance)

    # --- questions -----------------------------------------------------------------------

    def cached_blocks(self, instance: str, block_hashes: Sequence[int]) -> int:
        """How many of ``block_hashes``' leading blocks ``instance`` holds (any medium),
        or is expected to hold (``expect``)."""
        held = self._held.get(instance)
        if held is None:
            return 0
        blocks = held.blocks
        n = 0
        for h in block_hashes:
            if h not in blocks:
                break
            n += 1
        expected = held.expected
        if not expected or n == len(block_hashes):
            return n
        now = self._clock()
        for h in block_hashes[n:]:
            if h in blocks:
                n += 1
                continue
            until = expected.get(h)
            if until is None or until < now:
                break
            n += 1
        return n

    def block_size(self, instance: str) -> int | None:
        held = self._held.get(instance)
        return held.block_size if held else None

    def block_sizes(self) -> set[int]:
        return {h.block_size for h in self._held.values() if h.block_size}

    def size(self, instance: str | None = None) -> int:
        """Entries held (not counting expected ones), for ``instance`` or all."""
        if instance is not None:
            held = self._held.get(instance)
            return len(held.blocks) if held else 0
        return sum(len(h.blocks) for h in self._held.values())

    def instances(self) -> list[str]:
        return list(self._held)
