"""Model maker: seeded random-weight Llama models with a byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pd.models import EOS_TOKEN, PRESETS, main, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    assert make_model("tiny", out) == out
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_make_model_writes_a_complete_model(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pd_model.json"} <= names
    assert "tokenizer_config.json" in names
    config = json.loads((tiny / "config.json").read_text())
    spec = PRESETS["tiny"]
    assert config["num_hidden_layers"] == spec.num_layers
    assert config["num_key_value_heads"] == spec.num_kv_heads
    assert config["vocab_size"] == 258


def test_make_model_again_is_a_no_op(tiny: Path) -> None:
    before = _mtimes(tiny)
    assert make_model("tiny", tiny) == tiny
    assert _mtimes(tiny) == before


def test_builds_are_deterministic(tiny: Path, tmp_path: Path) -> None:
    other = make_model("tiny", tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_tokenizer_round_trips_bytes(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    for text in ["hello world", "  spaced\ttabs\nnewline", "héllo wörld 日本語 🙂", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8"))
        assert all(i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.eos_token == EOS_TOKEN
    assert tok.convert_tokens_to_ids([tok.bos_token, tok.eos_token]) == [256, 257]


def test_chat_template_renders(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><user>hi\n<assistant>"


def test_presets() -> None:
    assert PRESETS["small"].kv_bytes_per_token >= 8192
    assert PRESETS["tiny"].kv_bytes_per_token == 2 * 4 * 2 * 64 * 4


def test_unknown_preset_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="huge"):
        make_model("huge", tmp_path / "huge")
    assert not (tmp_path / "huge").exists()


def test_cli_prints_the_folder(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["tiny", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
