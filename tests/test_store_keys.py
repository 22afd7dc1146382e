"""Store keys: deterministic namespaces of KV compatibility, weights identity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pd.store import BlockKey, StoreNamespace, weights_identity
from pd.store import keys as keys_module
from tests.store_helpers import NAMESPACE, block_hashes, namespace


def test_the_digest_is_the_same_in_another_process_with_another_hash_seed() -> None:
    probe = (
        "from tests.store_helpers import NAMESPACE\n"
        "print(NAMESPACE.digest_hex)\n"
        "print(NAMESPACE.key(b'x' * 32) == NAMESPACE.key(b'x' * 32))\n"
    )
    digests = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert out[1] == "True"
        digests.add(out[0])
    assert digests == {NAMESPACE.digest_hex}
    assert len(NAMESPACE.digest) == 32


@pytest.mark.parametrize(
    "change",
    [
        {"model": "/models/other"},
        {"weights_id": "v" * 64},
        {"kv_dtype": "float16"},
        {"block_size": 32},
        {"num_layers": 3},
        {"num_kv_heads": 1},
        {"head_dim": 16},
        {"kv_layout": "FLASH_ATTN (2,N,16,2,8)"},
        {"tp_size": 2},
        {"tp_size": 2, "tp_rank": 1},
        {"block_hash_algo": "sha256_cbor"},
        {"extra": (("pp_rank", "1"),)},
    ],
)
def test_every_field_changes_the_digest(change: dict[str, object]) -> None:
    other = namespace(**change)
    assert other != NAMESPACE
    assert other.digest != NAMESPACE.digest
    assert other.key(b"h" * 32) != NAMESPACE.key(b"h" * 32)


def test_extra_pairs_in_another_order_name_the_same_namespace() -> None:
    a = namespace(extra=(("pp_rank", "0"), ("dcp", "1")))
    b = namespace(extra=(("dcp", "1"), ("pp_rank", "0")))
    assert a == b and a.digest == b.digest


@pytest.mark.parametrize(
    "change",
    [{"model": ""}, {"block_size": 0}, {"head_dim": -1}, {"tp_rank": 1}, {"kv_layout": ""}],
)
def test_invalid_namespaces_are_rejected(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        namespace(**change)


def test_keys_follow_the_block_hashes_in_order() -> None:
    hashes = block_hashes(4)
    keys = NAMESPACE.keys(hashes)
    assert [k.block_hash for k in keys] == hashes
    assert {k.namespace for k in keys} == {NAMESPACE.digest}
    with pytest.raises(ValueError):
        BlockKey(b"short", hashes[0])
    with pytest.raises(ValueError):
        BlockKey(NAMESPACE.digest, b"")


def _model_dir(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 64}')
    (root / "model.safetensors").write_bytes(b"\x01" * 4096)
    (root / "tokenizer.txt").write_text("not part of the identity")
    return root


def test_weights_identity_is_stable_and_follows_config_and_weights(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "m")
    first = weights_identity(model)
    assert first == weights_identity(model)
    assert len(first) == 64
    (model / "tokenizer.txt").write_text("changed")
    assert weights_identity(model) == first

    (model / "config.json").write_text('{"hidden_size": 65}')
    changed_config = weights_identity(model)
    assert changed_config != first

    (model / "model.safetensors").write_bytes(b"\x02" * 4096)  # same size, new content
    assert weights_identity(model) != changed_config


def test_large_weight_files_are_identified_by_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "SMALL_FILE_NBYTES", 100)
    model = _model_dir(tmp_path / "m")
    weights = model / "model.safetensors"
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    first = weights_identity(model)
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    assert weights_identity(model) != first

    # A Hugging Face cache snapshot: a symlink named for the blob's sha256.
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"\x03" * 4096)
    weights.unlink()
    weights.symlink_to(blob)
    linked = weights_identity(model)
    os.utime(blob, ns=(3_000_000_000, 3_000_000_000))
    assert weights_identity(model) == linked


def test_weights_identity_needs_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        weights_identity(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_identity(tmp_path)


def test_a_namespace_is_usable_as_a_dict_key() -> None:
    assert {NAMESPACE: 1}[namespace()] == 1
    assert isinstance(NAMESPACE, StoreNamespace)
