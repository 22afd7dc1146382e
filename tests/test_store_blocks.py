"""A worker's KV cache blocks as store payloads: saved from one cache, loaded into another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pd.store import DiskTier, HostTier, TieredStore
from pd.store.blocks import as_payload, gather_block, scatter_block
from pd.transfer.layout import KVCacheLayout
from tests.store_helpers import keys

NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 6, 2, 16, 8


def cpu_kv_caches(seed: int) -> dict[str, torch.Tensor]:
    """Two layers shaped like vLLM's CPU attention backend: (2, blocks, heads, size, dim)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM)
    return {
        f"model.layers.{i}.self_attn": torch.randn(shape, generator=generator).to(torch.bfloat16)
        for i in range(2)
    }


def test_a_block_saved_from_one_cache_loads_into_another_block_of_another(
    tmp_path: Path,
) -> None:
    source_caches, target_caches = cpu_kv_caches(1), cpu_kv_caches(2)
    untouched = {name: t.clone() for name, t in target_caches.items()}
    source = KVCacheLayout.from_kv_caches(source_caches, NUM_BLOCKS, BLOCK_SIZE)
    target = KVCacheLayout.from_kv_caches(target_caches, NUM_BLOCKS, BLOCK_SIZE)
    expected_nbytes = 2 * 2 * HEADS * BLOCK_SIZE * HEAD_DIM * 2  # layers, K/V, bf16
    assert source.bytes_per_block == expected_nbytes

    store = TieredStore(HostTier(10**6), DiskTier(tmp_path, 10**6))
    store.open()
    k = keys(1)[0]
    assert store.put(k, gather_block(source, 3))
    assert store.host is not None and store.host.evict(k)  # load from disk
    data = store.get(k)
    assert data is not None and len(data) == expected_nbytes
    scatter_block(target, 1, data)
    store.close()

    for name, tensor in target_caches.items():
        assert torch.equal(tensor[:, 1], source_caches[name][:, 3])
        others = [b for b in range(NUM_BLOCKS) if b != 1]
        assert torch.equal(tensor[:, others], untouched[name][:, others])


def test_a_payload_of_the_wrong_size_is_refused() -> None:
    layout = KVCacheLayout.from_kv_caches(cpu_kv_caches(1), NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(ValueError, match="payload of 10 bytes"):
        scatter_block(layout, 0, b"\0" * 10)


def test_tensors_and_arrays_become_their_bytes() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16).t()
    view = as_payload(tensor)
    assert bytes(view) == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    array = np.arange(10, dtype=np.int16)[::2]  # not contiguous
    assert bytes(as_payload(array)) == np.ascontiguousarray(array).tobytes()
    host = HostTier(1000)
    k = keys(1)[0]
    assert host.put(k, as_payload(tensor))
    stored = host.get(k)
    assert stored is not None
    restored = torch.frombuffer(bytearray(stored), dtype=torch.bfloat16).reshape(4, 3)
    assert torch.equal(restored, tensor)
