"""The store's settings: ``store:`` in cluster.yaml, ``"store"`` in kv_connector_extra_config.

Every key is optional. Unknown keys and bad values raise ``ValueError`` naming the key.
Two instances on one host with the same settings get the same ``socket_dir`` and so
share one store process (``pd.store.spawn``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# ipc:// paths live in sockaddr_un.sun_path (108 bytes on Linux, NUL included).
_MAX_SOCKET_PATH = 107
SOCKET_NAME = "store.sock"


@dataclass(frozen=True)
class StoreConfig:
    """Validated store settings. ``disk_path`` and ``socket_dir`` come back absolute."""

    host_gib: float = 1.0
    """Host-memory tier of the node's store, GiB; 0 turns it off."""
    disk_path: str | None = None
    """Directory of the disk tier; None turns it off. Survives restarts."""
    disk_gib: float = 10.0
    """Cap of the disk tier, GiB (whole files, headers included)."""
    save_decode: bool = False
    """Also save the blocks decode produced (the next chat turn's prompt holds them)."""
    socket_dir: str | None = None
    """Where the node's store process keeps its socket, locks and log. Default: a
    directory under the temp dir named by the user and ``disk_path`` (else ``host_gib``)."""
    timeout_ms: int = 1000
    """Deadline of one client call (a get or put adds time for its bytes); a timeout is
    a miss, never a hang. Only a store that accepts calls but does not answer costs it:
    a missing block, or a dead store, misses at once. 1000: a healthy store's lookup took
    up to 0.22 s on a 2-core machine at load 11 (200 timed out there)."""

    def __post_init__(self) -> None:
        for name in ("host_gib", "disk_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: must be a number >= 0 (GiB), got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.save_decode, bool):
            raise ValueError(f"save_decode: must be true or false, got {self.save_decode!r}")
        if (
            isinstance(self.timeout_ms, bool)
            or not isinstance(self.timeout_ms, int)
            or self.timeout_ms < 1
        ):
            raise ValueError(f"timeout_ms: must be an int >= 1, got {self.timeout_ms!r}")
        if self.disk_path is not None:
            if not isinstance(self.disk_path, str) or not self.disk_path:
                raise ValueError(f"disk_path: must be a directory or null, got {self.disk_path!r}")
            object.__setattr__(self, "disk_path", os.path.abspath(self.disk_path))
        if self.socket_dir is None:
            object.__setattr__(self, "socket_dir", self._default_socket_dir())
        elif not isinstance(self.socket_dir, str) or not self.socket_dir:
            raise ValueError(f"socket_dir: must be a directory or null, got {self.socket_dir!r}")
        socket_dir = os.path.abspath(str(self.socket_dir))
        object.__setattr__(self, "socket_dir", socket_dir)
        if len(os.path.join(socket_dir, SOCKET_NAME)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"socket_dir: {socket_dir!r} is too long for a Unix socket "
                f"(at most {_MAX_SOCKET_PATH - len(SOCKET_NAME) - 1} characters)"
            )

    def _default_socket_dir(self) -> str:
        # Named by the disk directory, which one process owns (its flock), so every
        # instance using it meets at one store, whose host tier is the first starter's
        # size; without a disk tier, by the host tier's size.
        owned = ["disk", self.disk_path] if self.disk_path else ["host", self.host_gib]
        tiers = json.dumps(owned).encode()
        digest = hashlib.sha256(tiers).hexdigest()[:12]
        return str(Path(tempfile.gettempdir()) / f"pd-store-{os.getuid()}-{digest}")

    @property
    def enabled(self) -> bool:
        """Whether any tier is on (with neither, there is nothing to start)."""
        return self.host_gib > 0 or self.disk_path is not None

    @property
    def socket_path(self) -> str:
        return os.path.join(str(self.socket_dir), SOCKET_NAME)

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def host_bytes(self) -> int:
        return int(self.host_gib * 2**30)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gib * 2**30)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StoreConfig:
        """Build from JSON/YAML values; ints are accepted where GiB floats are expected."""
        d = dict(d or {})
        if not all(isinstance(k, str) for k in d):
            raise ValueError(f"store keys must be strings, got {sorted(map(repr, d))}")
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown store key(s) {unknown}; known keys: {known}")
        return cls(**d)
