"""Per-request timestamps from every pd process into one file, for measuring the P/D path.

Off unless ``PD_TIMELINE`` names a file. Each ``mark`` appends one JSON line
(``{"ev", "rid", "t", "pid"}``, ``t`` from ``time.time()``, comparable across the
processes of one machine); appends of one short line are atomic (``O_APPEND``), so
the proxy, the engine core and the worker threads share the file without a lock.
``scripts/serving_bench/overhead.py`` reads it to split one request's P/D overhead.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pd import envs

_fd: int | None = None
_checked = False


def enabled() -> bool:
    global _fd, _checked
    if not _checked:
        _checked = True
        path = envs.PD_TIMELINE()
        if path:
            _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd is not None


def mark(event: str, request_id: str = "") -> None:
    """Record that ``event`` happened now to ``request_id`` (a no-op when off)."""
    if not enabled():
        return
    line = json.dumps({"ev": event, "rid": request_id, "t": time.time(), "pid": os.getpid()})
    assert _fd is not None
    os.write(_fd, (line + "\n").encode())


def read(path: str) -> list[dict[str, Any]]:
    """Every mark in ``path``, oldest first."""
    with open(path) as f:
        marks = [json.loads(line) for line in f if line.strip()]
    return sorted(marks, key=lambda m: float(m["t"]))
