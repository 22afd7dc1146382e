"""What a stored block is called: a namespace of KV compatibility, then vLLM's block hash.

A block's KV depends on its tokens and everything before them (vLLM's prefix-cache
block hash already chains the token ids, LoRA, ``cache_salt`` and multimodal inputs)
and on what computed it and how it is laid out in memory (the namespace). Two
blocks are interchangeable exactly when both agree. Everything here is
deterministic across processes, machines and restarts: sha256 over a canonical
encoding, never Python's ``hash()`` (which is salted per process).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

# Bumped when the encoding below changes, so an old digest can never collide with a new one.
_NAMESPACE_SCHEMA = "pd.store.namespace/1"
# Weight files up to this size are identified by content, larger ones by size and mtime.
SMALL_FILE_NBYTES = 16 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class StoreNamespace:
    """Everything that makes one worker's KV blocks incompatible with another's.

    ``kv_layout`` names how one block sits in memory (attention backend and the
    per-layer block shape, e.g. ``"CPU_ATTN (2,N,8,128,64)"``): two backends can hold
    the same number of bytes per block in a different order. ``extra`` holds further
    ``(name, value)`` pairs (pipeline rank, context parallelism, ...) without a
    schema change.
    """

    model: str  # the model as served (path or name), for people reading the store
    weights_id: str  # identity of the weights, e.g. ``weights_identity(model_dir)``
    kv_dtype: str  # dtype of the KV cache, e.g. "bfloat16", "fp8_e4m3"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int  # KV heads held by this rank
    head_dim: int
    kv_layout: str
    tp_size: int = 1
    tp_rank: int = 0
    block_hash_algo: str = "sha256"  # vLLM's --prefix-caching-hash-algo
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("model", "weights_id", "kv_dtype", "kv_layout", "block_hash_algo"):
            if not getattr(self, name):
                raise ValueError(f"StoreNamespace.{name} must not be empty")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"StoreNamespace.{name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"StoreNamespace.tp_rank {self.tp_rank} not in [0, {self.tp_size})")
        # Canonical order, so the same pairs given in another order name the same namespace.
        object.__setattr__(self, "extra", tuple(sorted((str(k), str(v)) for k, v in self.extra)))

    def canonical_json(self) -> str:
        """The encoding the digest is taken over: sorted keys, no whitespace, ASCII."""
        fields = asdict(self)
        fields["extra"] = [list(pair) for pair in self.extra]
        return json.dumps(
            {"schema": _NAMESPACE_SCHEMA, **fields},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )

    @cached_property
    def digest(self) -> bytes:
        """32 bytes naming this namespace; equal namespaces have equal digests everywhere."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).digest()

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    def key(self, block_hash: bytes) -> BlockKey:
        return BlockKey(self.digest, bytes(block_hash))

    def keys(self, block_hashes: Iterable[bytes]) -> list[BlockKey]:
        """Keys of a request's block hashes, in order (vLLM's ``request.block_hashes``)."""
        return [BlockKey(self.digest, bytes(h)) for h in block_hashes]


@dataclass(frozen=True, slots=True)
class BlockKey:
    """One stored block: the namespace's digest and vLLM's prefix-cache block hash.

    The hash is vLLM's ``BlockHash`` (bytes: 32 for sha256, 16 for xxhash), a chain
    over the block's tokens, its parent's hash and the extra keys. Python hashes
    this object only for in-process dicts; what is persisted is its bytes.
    """

    namespace: bytes
    block_hash: bytes

    def __post_init__(self) -> None:
        if len(self.namespace) != 32:
            raise ValueError(f"namespace digest must be 32 bytes, got {len(self.namespace)}")
        if not 0 < len(self.block_hash) <= 64:
            raise ValueError(f"block hash must be 1..64 bytes, got {len(self.block_hash)}")


def weights_identity(model_dir: str | os.PathLike[str]) -> str:
    """A sha256 hex digest that changes whenever the model in ``model_dir`` changes.

    Hashing many GiB of weights at every start-up is too slow, so:
    - ``*.json`` files (config, safetensors index, ...) are hashed by content;
    - weight files (``*.safetensors``, ``*.bin``, ...) by name and size, plus the
      content when small (<= 16 MiB), else the target's name when the file is a
      symlink (the Hugging Face cache names blobs by their sha256), else mtime.
    A copied or touched checkpoint therefore gets a new identity (cold misses,
    never stale KV); weights rewritten in place at the same size with the old mtime
    restored would not be noticed: pass an explicit ``weights_id`` then.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    digest = hashlib.sha256(b"pd.store.weights/1\0")
    seen_any = False
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            parts: Sequence[bytes] = (b"json", path.name.encode(), path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES):
            parts = (b"weights", path.name.encode(), *_weight_file_identity(path))
            seen_any = True
        else:
            continue
        for part in parts:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    if not seen_any:
        raise FileNotFoundError(f"no weight files in {root}")
    return digest.hexdigest()


def _weight_file_identity(path: Path) -> tuple[bytes, bytes]:
    stat = path.stat()
    size = str(stat.st_size).encode()
    if stat.st_size <= SMALL_FILE_NBYTES:
        content = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(2**20):
                content.update(chunk)
        return size, b"sha256:" + content.digest()
    if path.is_symlink():
        return size, b"target:" + Path(os.readlink(path)).name.encode()
    return size, b"mtime_ns:" + str(stat.st_mtime_ns).encode()
