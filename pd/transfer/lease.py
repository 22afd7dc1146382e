"""Leases: the prefill side's promise to keep a finished request's KV blocks alive.

vLLM's scheduler holds a request's blocks from the moment ``request_finished``
returns its ``kv_transfer_params``. The worker learns of it one engine step later
(the grant), which under load can be a whole prefill later. A lease ends when the
decode side releases it or when it expires; then its request id is handed back to
vLLM once (``take_ended``) and the scheduler frees the blocks.

So a read is allowed for a granted lease's own blocks, and for a request the worker
has not heard of yet (its blocks are held, its grant is on the way), but never for a
request whose lease already ended: those blocks may belong to someone else now.
Ended ids are remembered for ``ended_memory_s``. Thread-safe: the engine thread
grants and collects, the side-channel and transport threads read and release.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Lease:
    request_id: str
    block_ids: frozenset[int]
    expires_at: float  # time.monotonic() seconds


@dataclass
class EndedLeases:
    released: list[str]
    expired: list[str]


class LeaseTable:
    def __init__(
        self,
        lease_timeout_s: float,
        ended_memory_s: float = 600.0,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self._on_release = on_release  # wakes an engine step waiting for progress
        self._lease_timeout_s = lease_timeout_s
        self._ended_memory_s = max(ended_memory_s, 2 * lease_timeout_s)
        self._lock = threading.Lock()
        self._active: dict[str, Lease] = {}
        self._released: list[str] = []
        # Releases that arrived before their grant (the decode side can be faster than
        # the prefill engine's next step); applied when the grant comes.
        self._early_releases: dict[str, float] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # id -> when it ended

    def grant(self, request_id: str, block_ids: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._early_releases.pop(request_id, None) is not None:
                self._released.append(request_id)
                self._ended[request_id] = now
                return
            self._active[request_id] = Lease(
                request_id, frozenset(block_ids), now + self._lease_timeout_s
            )

    def may_read(self, request_id: str, block_ids: list[int]) -> bool:
        """Whether a decode worker may read these blocks of this request now."""
        with self._lock:
            lease = self._active.get(request_id)
            if lease is not None:
                return lease.block_ids.issuperset(block_ids)
            return request_id not in self._ended and request_id not in self._early_releases

    def release(self, request_id: str, now: float | None = None) -> bool:
        """End a lease early; False if it was unknown (already ended or not yet granted)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._active.pop(request_id, None) is not None:
                self._released.append(request_id)
                self._ended[request_id] = now
                released = True
            else:
                released = False
                if request_id not in self._ended:
                    # Remember a release for a grant still on its way, for one lease period.
                    self._early_releases[request_id] = now + self._lease_timeout_s
        if released and self._on_release is not None:
            self._on_release()
        return released

    def take_ended(self, now: float | None = None) -> EndedLeases:
        """Pop released and expired leases (each request id is returned once)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [rid for rid, lease in self._active.items() if lease.expires_at <= now]
            for rid in expired:
                del self._active[rid]
                self._ended[rid] = now
            for rid in [r for r, t in self._early_releases.items() if t <= now]:
                del self._early_releases[rid]
            while self._ended and next(iter(self._ended.values())) + self._ended_memory_s <= now:
                self._ended.popitem(last=False)
            released, self._released = self._released, []
        return EndedLeases(released=released, expired=expired)

    def __len__(self) -> int:
        with self._lock:
            return len(self._active)
