"""Small KV caches shaped like vLLM's, for transport tests."""

from __future__ import annotations

import torch

from pd.transfer.layout import KVCacheLayout

NUM_BLOCKS = 64
BLOCK_SIZE = 16


def make_layout(seed: int | None) -> tuple[KVCacheLayout, dict[str, torch.Tensor]]:
    """A vLLM-CPU-shaped cache (3 layers, (2, blocks, heads, block, dim)) in bf16."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    caches = {}
    for layer in range(3):
        shape = (2, NUM_BLOCKS, 2, BLOCK_SIZE, 8)
        t = torch.randn(shape, generator=gen) if gen else torch.zeros(shape)
        caches[f"layer.{layer}"] = t.to(torch.bfloat16)
    return KVCacheLayout.from_kv_caches(caches, NUM_BLOCKS, BLOCK_SIZE), caches
