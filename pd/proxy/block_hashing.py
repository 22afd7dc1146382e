"""A prompt's prefix-cache block hashes, computed in the proxy as the instances do.

vLLM names each full block of a request's tokens by a hash chained over its
parent's hash, the block's token ids and its extra keys (here only ``cache_salt``,
on the first block), seeded by ``NONE_HASH`` = the algorithm applied to the seed
string (``PYTHONHASHSEED`` if the instance has it, else vLLM's fixed default). Its KV
cache events name blocks by the digest's low 64 bits, as ints; so does the index.
Only the cryptographic algorithms are deterministic across processes, so only those
can be reproduced here (``sha256``: pickle, protocol 5, of the tuple; ``sha256_cbor``:
canonical CBOR). tests/test_kv_index.py checks the chain against vLLM's own function.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

# vLLM's seed when PYTHONHASHSEED is unset (kv_cache_utils.DEFAULT_NONE_HASH_SEED).
DEFAULT_SEED = "vllm-none-hash"
_LOW_64 = (1 << 64) - 1


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    import cbor2  # a dependency of vLLM; loaded only when the instances use it

    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


HASH_ALGORITHMS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
}


def external_hash(block_hash: bytes | int) -> int:
    """A block hash as KV events name it by default: the digest's low 64 bits."""
    if isinstance(block_hash, int):
        return block_hash & _LOW_64
    return int.from_bytes(block_hash, "big") & _LOW_64


class BlockHasher:
    """Hashes of a token sequence's full blocks of ``block_size`` tokens.

    Routing hashes every prompt, and a conversation's turns (or a tenant's questions)
    repeat the blocks of the ones before; so each block's hash is remembered with its
    tokens, under its parent's digest, for the last ``cache_blocks`` parents (half of them
    at least): a repeated
    block then costs a dict lookup and a comparison of its tokens (what, with the
    parent, it is a hash of) instead of a pickle and a sha256. Remembering costs a
    block hashed anew more the larger the cache (memory misses): on this machine, a new
    2k-token prompt took 0.09 ms to hash without it, 0.11 ms with 16,384 parents
    remembered and 0.13 ms with 65,536; one whose blocks but the last are remembered,
    0.02 ms.
    """

    def __init__(
        self, block_size: int, algorithm: str = "sha256", seed: str | None = None,
        cache_blocks: int = 16_384,
    ) -> None:  # fmt: skip
        """``seed``: the instances' ``PYTHONHASHSEED``; None when they have none."""
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size}")
        if algorithm not in HASH_ALGORITHMS:
            raise ValueError(
                f"prefix-caching hash algorithm {algorithm!r} cannot be reproduced outside "
                f"the instance; use one of {sorted(HASH_ALGORITHMS)}"
            )
        self.block_size = block_size
        self.algorithm = algorithm
        self._hash = HASH_ALGORITHMS[algorithm]
        self._none_hash = self._hash(DEFAULT_SEED if seed is None else seed)
        # parent digest -> (the tokens of the child block hashed last, (its digest, its
        # low 64 bits)): one child per parent (a parent's other children are hashed
        # again), keyed by bytes whose hash Python keeps, and checked token by token.
        # Unsalted blocks only (a salt is on the first block; its children differ by
        # their parent).
        # Two generations of half the size each: when the newer is full, the older is
        # dropped whole (O(1), where evicting entry by entry from a dict's front is not).
        self._known: dict[bytes, tuple[tuple[int, ...], tuple[bytes, int]]] = {}
        self._older: dict[bytes, tuple[tuple[int, ...], tuple[bytes, int]]] = {}
        self._generation = max(1, cache_blocks // 2)

    def _chain(self, token_ids: Sequence[int], cache_salt: str | None) -> list[tuple[bytes, int]]:
        size = self.block_size
        parent = self._none_hash
        known = self._known
        digest = self._hash
        out: list[tuple[bytes, int]] = []
        # After the first block not remembered, none of its children can be (their
        # parent is new): no more lookups, only remembering.
        remembered = True
        for start in range(0, len(token_ids) - size + 1, size):
            block = tuple(token_ids[start : start + size])
            if start == 0 and cache_salt:
                d = digest((parent, block, (("cache_salt", cache_salt),)))
                entry = (d, int.from_bytes(d[-8:], "big"))
            else:
                found = None
                if remembered:
                    found = known.get(parent) or self._older.get(parent)
                if found is not None and found[0] == block:
                    entry = found[1]
                    known[parent] = found  # (again) in the newer generation
                else:
                    remembered = False
                    d = digest((parent, block, None))
                    entry = (d, int.from_bytes(d[-8:], "big"))
                    known[parent] = (block, entry)
                if len(known) >= self._generation:  # the older generation goes
                    self._older, known = known, {}
                    self._known = known
            out.append(entry)
            parent = entry[0]
        return out

    def digests(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        """The full digests of the full blocks, in order (vLLM's ``request.block_hashes``)."""
        return [d for d, _ in self._chain(token_ids, cache_salt)]

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """The blocks' hashes as KV events carry them (low 64 bits)."""
        return [h for _, h in self._chain(token_ids, cache_salt)]

    def first_block(self, token_ids: Sequence[int]) -> int:
        """The hash of a chain's first block of ``token_ids`` (a full block, no salt)."""
        return external_hash(self._hash((self._none_hash, tuple(token_ids), None)))
