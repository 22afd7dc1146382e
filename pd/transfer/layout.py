"""Byte-level view of vLLM's paged KV cache, independent of the attention backend.

vLLM hands the connector one tensor per attention layer. Its shape and strides vary
by backend and device: the CPU backend uses ``(2, num_blocks, heads, block_size,
head_dim)`` (K and V split first), FlashAttention on GPU the same logical shape with
other strides, FlashInfer ``(num_blocks, 2, ...)``, MLA ``(num_blocks, block_size,
dim)``. Every one of them is, per layer, a few *regions*: for a fixed index of the
dimensions outside the block dimension, block ``i`` is a dense run of
``block_nbytes`` bytes at ``base + i * block_stride``. Transports move regions'
blocks and never need to know which backend made them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from pd.transfer.messages import LayoutSpec, RegionSpec


class LayoutError(ValueError):
    """The KV cache tensors cannot be described as regions of dense blocks."""


@dataclass(frozen=True)
class KVRegion:
    """``blocks[i]`` is block ``i`` of this region as ``block_nbytes`` uint8s."""

    name: str
    blocks: torch.Tensor  # uint8, shape (num_blocks, block_nbytes), rows may be strided

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_nbytes(self) -> int:
        return self.blocks.shape[1]

    @property
    def rows_are_dense(self) -> bool:
        """True when consecutive blocks are adjacent in memory (runs are zero-copy)."""
        return self.blocks.stride(0) == self.block_nbytes


@dataclass(frozen=True)
class KVCacheLayout:
    """All regions of one worker's KV cache, in a canonical order both sides share."""

    block_size: int
    regions: tuple[KVRegion, ...]

    @property
    def device(self) -> torch.device:
        return self.regions[0].blocks.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for, summed over all regions."""
        return sum(r.block_nbytes for r in self.regions)

    def spec(self) -> LayoutSpec:
        return LayoutSpec(
            block_size=self.block_size,
            regions=[RegionSpec(r.num_blocks, r.block_nbytes) for r in self.regions],
        )

    @classmethod
    def from_kv_caches(
        cls, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int
    ) -> KVCacheLayout:
        """Describe vLLM's per-layer KV tensors as regions of ``num_blocks`` blocks.

        Layers are taken in name order; layers that share memory are described once.
        """
        if not kv_caches:
            raise LayoutError("no KV cache tensors to describe")
        regions: list[KVRegion] = []
        seen: set[tuple[int, int]] = set()
        for name in sorted(kv_caches):
            for region in _regions_of(name, kv_caches[name], num_blocks):
                key = (region.blocks.data_ptr(), region.blocks.stride(0))
                if key not in seen:
                    seen.add(key)
                    regions.append(region)
        return cls(block_size=block_size, regions=tuple(regions))

    def check_compatible(self, remote: LayoutSpec) -> None:
        """Raise ``LayoutError`` unless ``remote``'s block ids address the same bytes."""
        local = self.spec()
        if local.block_size != remote.block_size:
            raise LayoutError(
                f"block_size differs: local {local.block_size}, remote {remote.block_size}"
            )
        local_shape = [r.block_nbytes for r in local.regions]
        remote_shape = [r.block_nbytes for r in remote.regions]
        if local_shape != remote_shape:
            raise LayoutError(
                f"KV layouts differ: local {local.describe()}, remote {remote.describe()}"
            )


def _regions_of(name: str, tensor: torch.Tensor, num_blocks: int) -> list[KVRegion]:
    block_dim = _find_block_dim(name, tensor, num_blocks)
    itemsize = tensor.element_size()
    block_stride = tensor.stride(block_dim)
    others = [d for d in range(tensor.dim()) if d != block_dim and tensor.shape[d] > 1]
    inner = sorted((d for d in others if tensor.stride(d) < block_stride), key=tensor.stride)
    outer = [d for d in others if tensor.stride(d) > block_stride]

    # The dims inside a block must be dense for a block to be one run of bytes.
    expected = 1
    for d in inner:
        if tensor.stride(d) != expected:
            raise LayoutError(
                f"layer {name}: shape {tuple(tensor.shape)} strides {tensor.stride()} "
                "has gaps inside a block; pd cannot move it"
            )
        expected *= tensor.shape[d]
    block_numel = math.prod(tensor.shape[d] for d in inner)

    storage = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    storage.set_(tensor.untyped_storage())
    base = tensor.storage_offset()
    regions = []
    for index in itertools.product(*(range(tensor.shape[d]) for d in outer)):
        offset = base + sum(i * tensor.stride(d) for i, d in zip(index, outer, strict=True))
        blocks = storage.as_strided(
            size=(num_blocks, block_numel * itemsize),
            stride=(block_stride * itemsize, 1),
            storage_offset=offset * itemsize,
        )
        label = name + "".join(f"[{i}]" for i in index)
        regions.append(KVRegion(name=label, blocks=blocks))
    return regions


def _find_block_dim(name: str, tensor: torch.Tensor, num_blocks: int) -> int:
    # vLLM puts the block dimension first, or second behind a K/V split of 2.
    candidates = [d for d in (0, 1) if d < tensor.dim() and tensor.shape[d] == num_blocks]
    if len(candidates) != 1:
        problem = "no" if not candidates else "more than one"
        raise LayoutError(
            f"layer {name}: {problem} candidate block dimension (0 or 1) in shape "
            f"{tuple(tensor.shape)} for num_blocks={num_blocks}"
        )
    return candidates[0]


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Split ids into runs of consecutive ids: ``(position, first_id, length)`` each.

    vLLM allocates blocks mostly in order, so a request's blocks form few runs and a
    run of a dense region is one contiguous range of memory.
    """
    runs: list[tuple[int, int, int]] = []
    for position, block_id in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            pos, first, length = runs[-1]
            runs[-1] = (pos, first, length + 1)
        else:
            runs.append((position, block_id, 1))
    return runs
