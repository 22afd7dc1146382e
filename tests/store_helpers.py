"""Shared by the store's unit tests: namespaces, block-hash chains, payloads."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from pd.store import BlockKey, StoreNamespace

NAMESPACE = StoreNamespace(
    model="/models/tiny",
    weights_id="w" * 64,
    kv_dtype="bfloat16",
    block_size=16,
    num_layers=2,
    num_kv_heads=2,
    head_dim=8,
    kv_layout="CPU_ATTN (2,N,2,16,8)",
)


def namespace(**changes: object) -> StoreNamespace:
    return replace(NAMESPACE, **changes)  # type: ignore[arg-type]


def block_hashes(n: int, seed: str = "doc") -> list[bytes]:
    """A chain like vLLM's: each 32-byte hash covers its parent and its block's tokens."""
    hashes, parent = [], hashlib.sha256(b"none-hash").digest()
    for i in range(n):
        parent = hashlib.sha256(parent + f"{seed}:{i}".encode()).digest()
        hashes.append(parent)
    return hashes


def keys(n: int, seed: str = "doc", ns: StoreNamespace = NAMESPACE) -> list[BlockKey]:
    return ns.keys(block_hashes(n, seed))


def payload(key: BlockKey, nbytes: int = 1000) -> bytes:
    """Bytes that depend on the key, so a block returned for the wrong key shows."""
    seed = hashlib.sha256(key.namespace + key.block_hash).digest()
    return (seed * (nbytes // len(seed) + 1))[:nbytes]


def files_under(root: Path, suffix: str = ".kv") -> list[Path]:
    return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())


def bytes_under(root: Path) -> int:
    return sum(os.path.getsize(p) for p in files_under(root))
