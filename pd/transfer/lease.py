"""Leases: the prefill side's promise to keep a finished request's KV blocks alive.

A lease is granted when the scheduler tells the worker a request finished with
``do_remote_decode``; it ends when the decode side releases it or when it expires.
Either way the request id is handed back to vLLM once (``take_ended``) so the
scheduler frees the blocks. Thread-safe: the engine thread grants and collects, the
side-channel and transport threads look up and release.
"""

from __future__ import annotations

import threading
import time
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
    def __init__(self, lease_timeout_s: float) -> None:
        self._lease_timeout_s = lease_timeout_s
        self._lock = threading.Lock()
        self._active: dict[str, Lease] = {}
        self._released: list[str] = []
        # Releases that arrived before their grant (the decode side can be faster than
        # the prefill engine's next step); applied when the grant comes.
        self._early_releases: dict[str, float] = {}

    def grant(self, request_id: str, block_ids: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._early_releases.pop(request_id, None) is not None:
                self._released.append(request_id)
                return
            self._active[request_id] = Lease(
                request_id, frozenset(block_ids), now + self._lease_timeout_s
            )

    def covers(self, request_id: str, block_ids: list[int]) -> bool | None:
        """True if the request's lease holds every block; None if no lease (yet)."""
        with self._lock:
            lease = self._active.get(request_id)
            if lease is None:
                return None
            return lease.block_ids.issuperset(block_ids)

    def release(self, request_id: str, now: float | None = None) -> bool:
        """End a lease early; False if it was unknown (already ended or not yet granted)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._active.pop(request_id, None) is not None:
                self._released.append(request_id)
                return True
            # Remember a release for a grant still on its way, for one lease period.
            self._early_releases[request_id] = now + self._lease_timeout_s
            return False

    def take_ended(self, now: float | None = None) -> EndedLeases:
        """Pop released and expired leases (each request id is returned once)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [rid for rid, lease in self._active.items() if lease.expires_at <= now]
            for rid in expired:
                del self._active[rid]
            for rid in [r for r, t in self._early_releases.items() if t <= now]:
                del self._early_releases[rid]
            released, self._released = self._released, []
        return EndedLeases(released=released, expired=expired)

    def __len__(self) -> int:
        with self._lock:
            return len(self._active)
