"""Rendezvous: pair a decode worker's question with the prefill request it waits for.

The proxy can send a request to the decode instance at the same time as to the
prefill instance, tagging both legs with one rendezvous id. Decode then parses,
schedules and allocates while prefill computes, and its worker asks the prefill
worker (``Resolve``) which request and blocks will hold the prompt. The answer
exists only once the prefill engine grants the lease, so the side channel parks
the question and answers it from this book: ``fulfil`` on the grant, ``fail`` when
the prefill request ended without KV. Decode may give up first (``cancel``); the
lease is then released as soon as it exists.

Thread-safe: the engine thread fulfils and fails, the side-channel thread looks up
and cancels. Entries are forgotten after ``memory_s``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """What a rendezvous resolved to: the request holding the KV, or why there is none."""

    request_id: str = ""
    block_ids: tuple[int, ...] = ()
    error: str = ""


class RendezvousBook:
    def __init__(self, memory_s: float) -> None:
        self.memory_s = memory_s
        self._lock = threading.Lock()
        self._outcomes: dict[str, tuple[Outcome, float]] = {}
        self._cancelled: dict[str, float] = {}

    def fulfil(
        self, rendezvous: str, request_id: str, block_ids: list[int], now: float | None = None
    ) -> bool:
        """Record the KV; False if decode already gave up (the caller releases the lease)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._cancelled.pop(rendezvous, None) is not None:
                return False
            self._outcomes[rendezvous] = (Outcome(request_id, tuple(block_ids)), now)
            return True

    def fail(self, rendezvous: str, reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._cancelled.pop(rendezvous, None)
            self._outcomes[rendezvous] = (Outcome(error=reason), now)

    def outcome(self, rendezvous: str) -> Outcome | None:
        """The answer, or None while the prefill instance is still working on it."""
        with self._lock:
            entry = self._outcomes.get(rendezvous)
            return entry[0] if entry is not None else None

    def cancel(self, rendezvous: str, now: float | None = None) -> str | None:
        """Decode gave up: the request id whose lease to release now, if already granted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._outcomes.pop(rendezvous, None)
            if entry is None:
                self._cancelled[rendezvous] = now
                return None
            return entry[0].request_id or None

    def is_cancelled(self, rendezvous: str) -> bool:
        """Decode gave up before the grant (its lease will be released when granted)."""
        with self._lock:
            return rendezvous in self._cancelled

    def forget_old(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        horizon = now - self.memory_s
        with self._lock:
            for table in (self._outcomes, self._cancelled):
                for key in [k for k, v in table.items() if _stamp(v) <= horizon]:
                    del table[key]


def _stamp(value: tuple[Outcome, float] | float) -> float:
    return value[1] if isinstance(value, tuple) else value
