"""KV cache events for ``routing: kv_aware``: each instance's ``--kv-events-config``,
and what the proxy must know to hash prompts as the instances do.

vLLM binds its event sockets only for wildcard (``tcp://*:P``) and ``ipc://``
endpoints. A local cluster's instances therefore publish on ``ipc://`` sockets in
/tmp, named per cluster start (nothing leaves the machine); a joined cluster's on
``tcp://*:P`` with ports from ``proxy.kv_aware.events_port`` (two per instance,
numbered across the cluster so instances sharing a node never collide), reached by
the proxy at the node address in the instance's URL.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

# vLLM's prefix-caching hash algorithms a process other than the instance can
# reproduce (the others are seeded randomly per process, or need xxhash).
REPRODUCIBLE_HASHES = ("sha256", "sha256_cbor")


def new_run_token() -> str:
    """Names one cluster start's ipc sockets (two clusters on a host never share one)."""
    return uuid.uuid4().hex[:10]


def endpoints(local: bool, name: str, ordinal: int, port_base: int, token: str) -> tuple[str, str]:
    """(publisher, replay) endpoints instance ``name`` (the ``ordinal``-th) binds."""
    if local:
        stem = f"ipc:///tmp/pd-kv-{token}-{name}"
        return f"{stem}.pub", f"{stem}.replay"
    port = port_base + 2 * ordinal
    return f"tcp://*:{port}", f"tcp://*:{port + 1}"


def remove_ipc_files(endpoints: list[tuple[str, str]]) -> None:
    """Remove the socket files of ``ipc://`` endpoints once their instances are gone
    (vLLM's publisher, killed with its engine, leaves them in /tmp)."""
    for pair in endpoints:
        for endpoint in pair:
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint.removeprefix("ipc://"))


def vllm_args(publisher: str, replay: str) -> list[str]:
    """The ``vllm serve`` flags that publish the engine's KV cache events there."""
    import json

    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": publisher,
        "replay_endpoint": replay,
        "topic": "",
    }
    return ["--kv-events-config", json.dumps(config)]


def hash_algorithm(engine_args: dict[str, Any]) -> str:
    return str(engine_args.get("prefix_caching_hash_algo") or "sha256")


def hash_seed(role_env: dict[str, str]) -> str | None:
    """The instances' ``PYTHONHASHSEED`` (their role's env, else the one they inherit)."""
    return role_env.get("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED"))


def check(common: dict[str, Any], roles: dict[str, tuple[dict[str, Any], dict[str, str]]]) -> None:
    """Raise ValueError (naming the key) when kv_aware cannot work with these instances.

    ``roles``: each role's engine_args and env."""
    if "kv_events_config" in common:
        raise ValueError("engine_args.kv_events_config: set by pd for routing: kv_aware; remove it")
    algorithms, seeds = set(), set()
    for role, (args, env) in roles.items():
        merged = {**common, **args}
        if "kv_events_config" in args:
            raise ValueError(
                f"{role}.engine_args.kv_events_config: set by pd for routing: kv_aware; remove it"
            )
        if merged.get("enable_prefix_caching") is False:
            raise ValueError(
                f"{role}.engine_args.enable_prefix_caching: routing: kv_aware routes by the "
                "instances' prefix caches; it must stay on"
            )
        algorithm = hash_algorithm(merged)
        if algorithm not in REPRODUCIBLE_HASHES:
            raise ValueError(
                f"{role}.engine_args.prefix_caching_hash_algo: {algorithm!r} hashes cannot be "
                f"computed by the proxy; routing: kv_aware needs one of {list(REPRODUCIBLE_HASHES)}"
            )
        algorithms.add(algorithm)
        seeds.add(hash_seed(env))
    if len(algorithms) > 1:
        raise ValueError(
            "engine_args.prefix_caching_hash_algo: prefill and decode must use the same one"
        )
    if len(seeds) > 1:
        raise ValueError("prefill.env/decode.env: PYTHONHASHSEED must be the same for both roles")
