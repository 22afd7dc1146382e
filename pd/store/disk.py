"""Disk tier: one checksummed file per block under a directory, LRU under a byte cap.

Layout under ``root`` (one directory may hold many namespaces; the cap covers all)::

    .lock                            flock'ed by the one process that owns the tier
    <namespace hex>/namespace.json   what the namespace is, for people (never read back)
    <namespace hex>/<hh>/<block hash hex>.kv

Each ``.kv`` file is one entry (``pd.store.entry``), written to a temp
file beside it and renamed into place (``os.replace``), so a reader sees a whole
entry or none. The index (key -> file size, in LRU order) lives in memory; at
``open()`` it is rebuilt from the file names, oldest modification time first (a hit
touches its file so recency survives a restart), and temp files a crash left behind
are deleted. Headers and checksums are verified on read: a torn, truncated or
corrupt entry is deleted, counted and reported as a miss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from pd.store.entry import CorruptEntry, encode_entry, read_entry
from pd.store.keys import BlockKey, StoreNamespace
from pd.store.stats import TierCounters, TierStats, WarningLimiter
from pd.store.tier import Payload, Tier

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TEMP_SUFFIX = ".tmp"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


class DiskTierInUse(RuntimeError):
    """Another process owns this directory (holds its ``.lock``)."""


class DiskTier(Tier):
    """Blocks as files under ``root``, least recently used deleted first.

    Usage counts whole files (header included) against ``capacity_bytes``. Writes
    happen outside the index lock, so while several threads write at once the
    directory may briefly hold those writes above the cap. ``fsync=True`` syncs each
    file before renaming it; without it a power loss can leave a torn file, which
    the checksum turns into a miss.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int, fsync: bool = False):
        if capacity_bytes < 0:
            raise ValueError(f"DiskTier capacity_bytes must be >= 0, got {capacity_bytes}")
        self.root = Path(root)
        self._capacity_bytes = capacity_bytes
        self._fsync = fsync
        self._index: OrderedDict[BlockKey, int] = OrderedDict()
        self._usage_bytes = 0
        self._counters = TierCounters()
        self._warnings = WarningLimiter(logger, self._counters.warnings)
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._made_dirs: set[Path] = set()
        self._temp_ids = itertools.count()
        self._opened = False
        self.temp_files_removed = 0

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Take the directory's lock and rebuild the index from the files in it.

        Raises ``DiskTierInUse`` when another process owns the directory. A
        directory that cannot be created or written is a counted warning: the tier
        then serves what it finds and stores nothing.
        """
        with self._lock:
            if self._opened:
                return
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._warn_os("open", e, f"cannot create {self.root}")
            self._lock_fd = self._take_lock()
            found = self._scan()
            for _mtime_ns, key, nbytes in sorted(found, key=lambda entry: entry[0]):
                self._index[key] = nbytes
                self._usage_bytes += nbytes
            self._counters.recovered_entries = len(found)
            self._evict_to(self._capacity_bytes)
            self._opened = True

    def close(self) -> None:
        """Release the directory. Stop the threads calling get/put first: they raise after."""
        with self._lock:
            self._opened = False
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _take_lock(self) -> int | None:
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:  # a read-only directory: lock the existing file if there is one
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskTierInUse(f"{self.root} is owned by another process") from None
        return fd

    def _scan(self) -> list[tuple[int, BlockKey, int]]:
        found: list[tuple[int, BlockKey, int]] = []
        for ns_dir in _subdirs(self.root):
            namespace = _from_hex(ns_dir.name)
            if namespace is None or len(namespace) != 32:
                continue
            for entry in _files(ns_dir):  # namespace.json's temp file
                if entry.name.endswith(_TEMP_SUFFIX):
                    self._unlink(Path(entry.path))
                    self.temp_files_removed += 1
            for fan_dir in _subdirs(ns_dir):
                for entry in _files(fan_dir):
                    name = entry.name
                    if name.endswith(_TEMP_SUFFIX):
                        self._unlink(Path(entry.path))
                        self.temp_files_removed += 1
                        continue
                    block_hash = _from_hex(name.removesuffix(_SUFFIX))
                    if not name.endswith(_SUFFIX) or not block_hash or len(block_hash) > 64:
                        continue  # not ours: leave it alone
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue
                    found.append((stat.st_mtime_ns, BlockKey(namespace, block_hash), stat.st_size))
        return found

    def register_namespace(self, namespace: StoreNamespace) -> None:
        """Write ``<namespace>/namespace.json`` once, so a person can tell folders apart."""
        path = self.root / namespace.digest_hex / "namespace.json"
        if path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f"namespace.json.{os.getpid()}{_TEMP_SUFFIX}")
            temp.write_text(namespace.canonical_json() + "\n")
            os.replace(temp, path)
        except OSError as e:
            with self._lock:
                self._warn_os("write", e, f"cannot write {path}")

    # -- Tier --------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def path_of(self, key: BlockKey) -> Path:
        name = key.block_hash.hex()
        return self.root / key.namespace.hex() / name[:2] / (name + _SUFFIX)

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            self._check_open()
            if key not in self._index:
                self._counters.misses += 1
                return None
            self._index.move_to_end(key)
        path = self.path_of(key)
        try:
            payload = read_entry(path, key)
        except FileNotFoundError:
            with self._lock:  # deleted behind our back: forget it
                self._drop(key)
                self._counters.misses += 1
            return None
        except CorruptEntry as e:
            with self._lock:
                self._drop(key)
                self._counters.misses += 1
                self._counters.corrupt_dropped += 1
                self._warnings.warn("corrupt_entry", f"dropped {path}: {e}")
                self._unlink(path)
            return None
        except OSError as e:
            with self._lock:
                self._counters.misses += 1
                self._warn_os("read", e, f"cannot read {path}")
            return None
        with self._lock:
            self._counters.hits += 1
            self._counters.bytes_loaded += len(payload)
        with contextlib.suppress(OSError):
            os.utime(path)  # recency that survives a restart
        return payload

    def readahead(self, keys: Sequence[BlockKey]) -> int:
        """Ask the kernel to start reading ``keys``' files into the page cache
        (``POSIX_FADV_WILLNEED``, asynchronous), so that a ``get`` soon after reads
        memory. A hint: nothing is counted as a hit, and a key not stored or a file
        that cannot be opened is skipped. Returns how many files were hinted."""
        with self._lock:
            stored = [key for key in keys if key in self._index]
        hinted = 0
        for key in stored:
            try:
                fd = os.open(self.path_of(key), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                hinted += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return hinted

    def put(self, key: BlockKey, data: Payload) -> bool:
        head, payload = encode_entry(key, data)
        file_nbytes = len(head) + payload.nbytes
        with self._lock:
            self._check_open()
            if key in self._index:
                self._index.move_to_end(key)
                return True
            if file_nbytes > self._capacity_bytes:
                self._counters.refused_puts += 1
                return False
        path = self.path_of(key)
        try:
            self._write_atomically(path, head, payload)
        except OSError as e:
            with self._lock:
                self._counters.failed_writes += 1
                self._warn_os("write", e, f"cannot write {path}")
            return False
        with self._lock:
            previous = self._index.pop(key, None)  # a concurrent put of the same key
            self._usage_bytes += file_nbytes - (previous or 0)
            self._index[key] = file_nbytes
            if previous is None:
                self._counters.puts += 1
                self._counters.bytes_stored += payload.nbytes
            self._evict_to(self._capacity_bytes)
            return key in self._index

    def evict(self, key: BlockKey) -> bool:
        with self._lock:
            if key not in self._index:
                return False
            self._drop(key)
            self._unlink(self.path_of(key))
            return True

    def usage_bytes(self) -> int:
        with self._lock:
            return self._usage_bytes

    def stats(self) -> TierStats:
        with self._lock:
            return self._counters.snapshot(
                self.name, self._capacity_bytes, self._usage_bytes, len(self._index)
            )

    # -- internals (callers hold self._lock where noted) -------------------------

    def _check_open(self) -> None:
        if not self._opened:
            raise RuntimeError("DiskTier used before open() or after close()")

    def _write_atomically(self, path: Path, head: bytes, payload: memoryview) -> None:
        directory = path.parent
        if directory not in self._made_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(directory)
        temp = path.with_name(f"{path.name}.{os.getpid()}.{next(self._temp_ids)}{_TEMP_SUFFIX}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(payload)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(temp, path)
        except OSError:
            self._made_dirs.discard(directory)  # deleted from outside: make it again next time
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise

    def _evict_to(self, limit_bytes: int) -> None:
        """Holding the lock: delete least recently used files until usage <= limit."""
        while self._usage_bytes > limit_bytes and self._index:
            key, nbytes = self._index.popitem(last=False)
            self._usage_bytes -= nbytes
            self._counters.evictions += 1
            self._counters.evicted_bytes += nbytes
            self._unlink(self.path_of(key))

    def _drop(self, key: BlockKey) -> None:
        """Holding the lock: forget ``key`` (its file is handled by the caller)."""
        nbytes = self._index.pop(key, None)
        if nbytes is not None:
            self._usage_bytes -= nbytes

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self._warn_os("delete", e, f"cannot delete {path}")

    def _warn_os(self, action: str, error: OSError, message: str) -> None:
        """Holding the lock: count and maybe log an I/O failure by its kind."""
        if error.errno in _DISK_FULL:
            kind = "disk_full"
        elif error.errno in _READ_ONLY:
            kind = "read_only"
        else:
            kind = f"{action}_error"
        self._warnings.warn(kind, f"{message}: {error.strerror or error}")


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _files(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def _from_hex(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None
