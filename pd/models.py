"""Model maker: seeded random-weight Llama models with a byte-level tokenizer.

Nothing is downloaded: the config, weights and tokenizer are built locally and saved
with ``save_pretrained`` into a cache folder, so tests, benchmarks and the default
cluster config run on machines without access to a model hub. The same preset always
produces the same files, so greedy output is reproducible across machines.

    pd-make-model tiny            # prints the model's folder
    pd-make-model small --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pd import envs

# Byte-level tokens come first (ids 0-255); the specials follow.
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)

# A minimal chat template so /v1/chat/completions works on generated models.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<{{ message['role'] }}>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a generated Llama model. ``kv_bytes_per_token`` follows from it."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    dtype: str
    seed: int
    init_std: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


PRESETS: dict[str, ModelPreset] = {
    # Tests: loads in seconds; float32 keeps greedy argmax stable across batch shapes.
    "tiny": ModelPreset(
        name="tiny",
        num_layers=4,
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
        dtype="float32",
        seed=1234,
        init_std=0.08,
    ),
    # Benchmarks: 8 KiB of KV per token, a 1,000-token prefill takes a few hundred ms
    # on one core. float32: CPUs without AVX-512 BF16 emulate bf16 matmuls, slowly.
    "small": ModelPreset(
        name="small",
        num_layers=8,
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=8192,
        dtype="float32",
        seed=4321,
        init_std=0.08,
    ),
}

# Bump when the generated files change, so caches made by older code are rebuilt.
_MAKER_VERSION = 1


def default_cache_dir() -> Path:
    return Path(envs.PD_MODEL_CACHE())


def model_dir(preset: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"pd-{preset}-llama"


def make_model(preset: str = "tiny", out_dir: Path | None = None) -> Path:
    """Build the preset's model into ``out_dir`` (default: the cache) and return it.

    Idempotent: an existing, complete model of the same preset and maker version is
    reused as is.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(out_dir) if out_dir is not None else model_dir(preset)
    stamp = out / "pd_model.json"
    want = {"maker_version": _MAKER_VERSION, **asdict(spec)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out

    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(out)
    _save_model(spec, out)
    # The stamp is written last: its presence means the folder is complete.
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(want, indent=2))
    os.replace(tmp, stamp)
    return out


def _save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # alphabet() is a set: sort by the byte each character stands for, so ids are stable.
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(byte_chars)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _save_model(spec: ModelPreset, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = 256 + len(SPECIAL_TOKENS)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        dtype=spec.dtype,  # transformers 5 name of torch_dtype (same config.json)
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pd-make-model",
        description="Write a seeded random-weight Llama model with a byte-level tokenizer "
        "(no network). Prints the model folder.",
    )
    parser.add_argument("preset", nargs="?", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the PD_MODEL_CACHE cache)"
    )
    args = parser.parse_args(argv)
    print(make_model(args.preset, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
