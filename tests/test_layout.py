"""KVCacheLayout: vLLM's per-layer KV tensors described as regions of dense blocks."""

from __future__ import annotations

import pytest
import torch

from pd.transfer.layout import KVCacheLayout, KVRegion, LayoutError, block_runs
from pd.transfer.messages import LayoutSpec, RegionSpec

NB, BS, H, D = 5, 4, 2, 8  # num_blocks, block_size, kv heads, head_dim
DTYPE = torch.float16
ITEM = torch.tensor([], dtype=DTYPE).element_size()


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DTYPE)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).flatten()


def assert_block_is(region: KVRegion, i: int, target: torch.Tensor, base: torch.Tensor) -> None:
    """``region.blocks[i]`` reads and writes exactly ``target``, a view into ``base``."""
    assert torch.equal(region.blocks[i], _bytes(target))
    before = base.clone()
    saved = target.clone()
    pattern = torch.randint(0, 256, (region.block_nbytes,), dtype=torch.uint8)
    region.blocks[i].copy_(pattern)
    assert torch.equal(_bytes(target), pattern)
    target.copy_(saved)  # same-dtype copy: bit-exact
    assert torch.equal(base.view(torch.uint8), before.view(torch.uint8))


def test_vllm_cpu_layout_is_one_region_per_layer() -> None:
    caches = {f"layer.{n}": _randn(NB, 2, 128, 128) for n in range(3)}
    layout = KVCacheLayout.from_kv_caches(caches, NB, 128)
    assert [r.name for r in layout.regions] == ["layer.0", "layer.1", "layer.2"]
    assert layout.block_size == 128
    assert layout.bytes_per_block == 3 * 2 * 128 * 128 * ITEM
    assert layout.device == torch.device("cpu")
    for region, name in zip(layout.regions, sorted(caches), strict=True):
        assert region.num_blocks == NB
        assert region.block_nbytes == 2 * 128 * 128 * ITEM
        assert region.rows_are_dense
        for i in (0, NB - 1):
            assert_block_is(region, i, caches[name][i], caches[name])


def test_flash_attention_layout_splits_k_and_v() -> None:
    caches = {"b": _randn(2, NB, BS, H, D), "a": _randn(2, NB, BS, H, D)}
    layout = KVCacheLayout.from_kv_caches(caches, NB, BS)
    assert [r.name for r in layout.regions] == ["a[0]", "a[1]", "b[0]", "b[1]"]
    assert layout.spec() == LayoutSpec(BS, [RegionSpec(NB, BS * H * D * ITEM)] * 4)
    for region in layout.regions:
        assert region.rows_are_dense
    a = caches["a"]
    for kv in (0, 1):
        for i in range(NB):
            assert_block_is(layout.regions[kv], i, a[kv, i], a)


def test_flashinfer_layout_is_one_region_per_layer() -> None:
    t = _randn(NB, 2, BS, H, D)
    (region,) = KVCacheLayout.from_kv_caches({"l": t}, NB, BS).regions
    assert region.block_nbytes == 2 * BS * H * D * ITEM
    assert region.rows_are_dense
    for i in range(NB):
        assert_block_is(region, i, t[i], t)


def test_permuted_view_is_described_by_physical_order() -> None:
    # Logical (2, NB, ...) over memory laid out (NB, 2, ...): K and V of a block are
    # adjacent in memory, so each block is one dense run holding K then V.
    base = _randn(NB, 2, BS, H, D)
    t = base.transpose(0, 1)
    layout = KVCacheLayout.from_kv_caches({"l": t}, NB, BS)
    (region,) = layout.regions
    assert region.block_nbytes == 2 * BS * H * D * ITEM
    assert region.rows_are_dense
    for i in range(NB):
        assert torch.equal(region.blocks[i], torch.cat([_bytes(t[0, i]), _bytes(t[1, i])]))
        assert_block_is(region, i, base[i], base)
    # Same memory as a FlashInfer-style tensor: both describe it the same way.
    layout.check_compatible(KVCacheLayout.from_kv_caches({"l": base}, NB, BS).spec())


def test_layers_interleaved_in_one_tensor_have_strided_rows() -> None:
    # One allocation (NB, layers, 2, ...) with a per-layer view: gaps between blocks.
    base = _randn(NB, 3, 2, BS, H, D)
    caches = {f"l{n}": base[:, n] for n in range(3)}
    layout = KVCacheLayout.from_kv_caches(caches, NB, BS)
    assert len(layout.regions) == 3
    for n, region in enumerate(layout.regions):
        assert not region.rows_are_dense
        assert region.block_nbytes == 2 * BS * H * D * ITEM
        for i in range(NB):
            assert_block_is(region, i, base[i, n], base)


def test_layers_sharing_memory_are_described_once() -> None:
    shared = _randn(2, NB, BS, H, D)
    caches = {"a": shared, "b": _randn(2, NB, BS, H, D), "c": shared}
    layout = KVCacheLayout.from_kv_caches(caches, NB, BS)
    assert [r.name for r in layout.regions] == ["a[0]", "a[1]", "b[0]", "b[1]"]


def test_block_dim_found_when_num_blocks_equals_another_dim() -> None:
    # FlashAttention shape (2, num_blocks, block_size, heads, head_dim) where
    # num_blocks happens to equal head_dim (e.g. a small --num-gpu-blocks-override).
    t = _randn(2, D, BS, H, D)
    layout = KVCacheLayout.from_kv_caches({"l": t}, D, BS)
    assert layout.spec() == LayoutSpec(BS, [RegionSpec(D, BS * H * D * ITEM)] * 2)
    assert_block_is(layout.regions[1], 3, t[1, 3], t)


def test_no_block_dimension_raises() -> None:
    with pytest.raises(LayoutError, match="num_blocks=7"):
        KVCacheLayout.from_kv_caches({"l": _randn(2, NB, BS, H, D)}, 7, BS)


def test_gaps_inside_a_block_raise() -> None:
    t = _randn(2, NB, BS, H, D)[..., : D // 2]
    with pytest.raises(LayoutError, match="gaps inside a block"):
        KVCacheLayout.from_kv_caches({"l": t}, NB, BS)


def test_empty_caches_raise() -> None:
    with pytest.raises(LayoutError):
        KVCacheLayout.from_kv_caches({}, NB, BS)


def test_check_compatible() -> None:
    layout = KVCacheLayout.from_kv_caches({"l": _randn(2, NB, BS, H, D)}, NB, BS)
    layout.check_compatible(layout.spec())
    # Block count may differ between instances; block ids just have to address same bytes.
    layout.check_compatible(LayoutSpec(BS, [RegionSpec(NB * 10, BS * H * D * ITEM)] * 2))
    with pytest.raises(LayoutError, match="block_size"):
        layout.check_compatible(LayoutSpec(BS * 2, layout.spec().regions))
    with pytest.raises(LayoutError, match="differ"):
        layout.check_compatible(LayoutSpec(BS, [RegionSpec(NB, BS * H * D * 4)] * 2))
    with pytest.raises(LayoutError, match="differ"):
        layout.check_compatible(LayoutSpec(BS, [RegionSpec(NB, BS * H * D * ITEM)] * 3))


def test_block_runs() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert block_runs([]) == []
    assert block_runs([7]) == [(0, 7, 1)]
    assert block_runs([1, 1]) == [(0, 1, 1), (1, 1, 1)]


def test_ambiguous_block_dimension_raises() -> None:
    # (2, 2, ...) with num_blocks=2: K/V split first or blocks first? Refuse to guess.
    with pytest.raises(LayoutError, match="more than one"):
        KVCacheLayout.from_kv_caches({"l": _randn(2, 2, BS, H, D)}, 2, BS)
