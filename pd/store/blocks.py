"""Blocks of a worker's KV cache as store payloads, and back.

One store entry is one vLLM block id of one worker: the block's bytes in every
region of its ``KVCacheLayout`` (all layers, K and V), concatenated in the layout's
canonical order, ``layout.bytes_per_block`` bytes in all. A block saved by one
instance can be loaded into any block id of another whose namespace is equal
(equal namespaces imply equal layouts).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def gather_blocks(layout: KVCacheLayout, block_ids: Sequence[int]) -> np.ndarray:
    """Copy blocks ``block_ids`` into one new host array, row ``i`` the payload of
    ``block_ids[i]`` (as ``gather_block`` makes it).

    One copy per region for the whole list. On a CPU KV cache it is numpy's, not
    torch's: a torch copy this size from a thread other than the engine's starts an
    OpenMP team of its own, whose threads compete with the engine's for the same cores
    (``gather_block`` per block and region did that hundreds of times per request).
    """
    n = len(block_ids)
    if layout.device.type == "cpu":
        out = np.empty((n, layout.bytes_per_block), dtype=np.uint8)
        index = np.asarray(block_ids, dtype=np.intp)
        offset = 0
        for region in layout.regions:
            nbytes = region.block_nbytes
            if n and not (index.min() >= 0 and index.max() < region.num_blocks):
                raise IndexError(f"block ids {list(block_ids)} outside 0..{region.num_blocks}")
            # mode="clip" (the ids are checked above) writes straight into the strided
            # out; the default mode would buffer the whole region first.
            np.take(region.blocks.numpy(), index, axis=0, out=out[:, offset : offset + nbytes],
                    mode="clip")  # fmt: skip
            offset += nbytes
        return out
    staged = torch.empty((n, layout.bytes_per_block), dtype=torch.uint8)
    device_index = torch.tensor(list(block_ids), dtype=torch.long, device=layout.device)
    offset = 0
    for region in layout.regions:
        nbytes = region.block_nbytes
        staged[:, offset : offset + nbytes].copy_(region.blocks.index_select(0, device_index))
        offset += nbytes
    return staged.numpy()


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
