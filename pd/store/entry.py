"""One disk-tier entry file: header, block hash, payload.

``HEADER`` is little-endian: magic ``PDKV``, format version, key length, the
namespace's 32-byte digest, payload length, and a CRC-32 (zlib) over the header with
the CRC zeroed, the key and the payload. CRC-32 rather than sha256: it guards
against torn and decayed files, not an adversary (namespace and block hash are
compared byte for byte), and measured about 2.4x faster on 1 MiB blocks here
(docs/store.md). A file of another format version reads as corrupt: the store is a
cache, so an entry it cannot read is recomputed.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from pd.store.keys import BlockKey
from pd.store.tier import Payload

MAGIC = b"PDKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHH32sQI")


class CorruptEntry(ValueError):
    """An entry's bytes are not a whole, matching, intact block."""


def encode_entry(key: BlockKey, data: Payload) -> tuple[bytes, memoryview]:
    """(header + key, payload) of one entry file."""
    payload = memoryview(data)
    if not payload.c_contiguous:
        payload = memoryview(bytes(payload))
    payload = payload.cast("B")
    fields = (MAGIC, FORMAT_VERSION, len(key.block_hash), key.namespace, payload.nbytes)
    crc = zlib.crc32(payload, zlib.crc32(key.block_hash, zlib.crc32(HEADER.pack(*fields, 0))))
    return HEADER.pack(*fields, crc) + key.block_hash, payload


def read_entry(path: Path, key: BlockKey) -> bytes:
    """The payload of ``key``'s entry file; ``CorruptEntry`` unless it is whole and intact."""
    with path.open("rb") as f:
        file_nbytes = os.fstat(f.fileno()).st_size
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            raise CorruptEntry(f"{file_nbytes} bytes, shorter than the header")
        magic, version, key_len, namespace, payload_len, crc = HEADER.unpack(head)
        if magic != MAGIC:
            raise CorruptEntry(f"bad magic {magic!r}")
        if version != FORMAT_VERSION:
            raise CorruptEntry(f"format version {version}, expected {FORMAT_VERSION}")
        if file_nbytes != HEADER.size + key_len + payload_len:
            raise CorruptEntry(
                f"{file_nbytes} bytes, header says {HEADER.size + key_len + payload_len}"
            )
        block_hash = f.read(key_len)
        if namespace != key.namespace or block_hash != key.block_hash:
            raise CorruptEntry("entry is for another key")
        payload = f.read(payload_len)
    unsigned = HEADER.pack(magic, version, key_len, namespace, payload_len, 0)
    expected = zlib.crc32(payload, zlib.crc32(block_hash, zlib.crc32(unsigned)))
    if len(payload) != payload_len or expected != crc:
        raise CorruptEntry("checksum mismatch")
    return payload
