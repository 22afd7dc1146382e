"""Blocks of a worker's KV cache as store payloads, and back.

One store entry is one vLLM block id of one worker: the block's bytes in every
region of its ``KVCacheLayout`` (all layers, K and V), concatenated in the layout's
canonical order, ``layout.bytes_per_block`` bytes in all. A block saved by one
instance can be loaded into any block id of another whose namespace is equal
(equal namespaces imply equal layouts).
"""

from __future__ import annotations

import numpy as np
import torch

from pd.store.tier import Payload
from pd.transfer.layout import KVCacheLayout


def gather_block(layout: KVCacheLayout, block_id: int) -> bytearray:
    """Copy block ``block_id`` of every region into one new host buffer."""
    out = bytearray(layout.bytes_per_block)
    view = torch.frombuffer(out, dtype=torch.uint8)
    offset = 0
    for region in layout.regions:
        nbytes = region.block_nbytes
        view[offset : offset + nbytes].copy_(region.blocks[block_id])
        offset += nbytes
    return out


def scatter_block(layout: KVCacheLayout, block_id: int, data: Payload) -> None:
    """Copy a payload made by ``gather_block`` into block ``block_id`` of every region."""
    source = np.frombuffer(data, dtype=np.uint8)
    if source.nbytes != layout.bytes_per_block:
        raise ValueError(
            f"payload of {source.nbytes} bytes for a layout of {layout.bytes_per_block} "
            "bytes per block"
        )
    on_host = layout.device.type == "cpu"
    if not on_host:
        # torch wants a writable buffer to wrap; one host copy until a pinned
        # staging buffer replaces it.
        staged = torch.frombuffer(bytearray(source), dtype=torch.uint8)
    offset = 0
    for region in layout.regions:
        nbytes = region.block_nbytes
        target = region.blocks[block_id]
        if on_host:
            np.copyto(target.numpy(), source[offset : offset + nbytes])
        else:
            target.copy_(staged[offset : offset + nbytes], non_blocking=False)
        offset += nbytes


def as_payload(block: torch.Tensor | np.ndarray) -> memoryview:
    """A tensor's or array's bytes (C order) as a buffer ``put`` accepts, copied to host."""
    if isinstance(block, torch.Tensor):
        flat = block.detach().to("cpu").contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy().data
    return np.ascontiguousarray(block).reshape(-1).view(np.uint8).data
