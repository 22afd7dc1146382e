"""Every environment variable pd reads, declared once, typed, with the ``PD_`` prefix.

Each is a function so the value is read when used, not frozen at import time.
"""

from __future__ import annotations

import os
from pathlib import Path


def _str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def PD_MODEL_CACHE() -> str:
    """Folder for generated models (default: ~/.cache/pd/models)."""
    return _str("PD_MODEL_CACHE", str(Path.home() / ".cache" / "pd" / "models"))


def PD_HOST() -> str:
    """Address the transfer side channel binds and advertises (default: 127.0.0.1)."""
    return _str("PD_HOST", "127.0.0.1")


def PD_LOG_LEVEL() -> str:
    """Log level of pd's loggers (default: INFO)."""
    return _str("PD_LOG_LEVEL", "INFO").upper()


def PD_STORE_MANAGED() -> bool:
    """Set by pd-serve for its instances: the node's KV store is run by pd-serve's store
    actor (pd.cluster.store_actor), so an instance never starts one itself."""
    return os.environ.get("PD_STORE_MANAGED", "") == "1"


def PD_TIMELINE() -> str:
    """A file each pd process appends per-request timestamps to (pd.transfer.timeline; default:
    unset, nothing recorded). For measuring the P/D path, not for production."""
    return _str("PD_TIMELINE", "")
