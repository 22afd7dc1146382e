"""The two costs the store adds when it does not help.

lookup_on_miss
    What a request that misses everywhere pays: ``StoreClient.lookup`` (the call the
    scheduler makes in ``get_num_new_matched_tokens``) against the running store
    process of the benchmark's instance, holding what the other phases stored, with a
    whole max_model_len prompt's worth of block hashes that are not stored.
disk_load_readahead
    What the store's readahead buys a load from disk: a store process of its own
    (host tier off, so every get reads the disk) holding 16 blocks of the small
    model's size, the page cache dropped before each load; pairs alternating: a
    lookup, one engine step's wait, then the get (the lookup hints the blocks into the
    page cache, as the scheduler's does), against the get with no lookup before it.
step_time_paired
    A fixed decode-heavy load (unique prompts: nothing to reuse, every prompt saved
    by the store system) on both systems, started side by side, in alternating rounds
    (store then vllm, vllm then store, ...), each after the other system's saves
    settled; the engine's step time read as the mean of vLLM's own
    ``vllm:inter_token_latency_seconds`` (the gap between a request's tokens as its
    engine core produced them: one step each in decode), and the load's wall time.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.keys import StoreNamespace
from pd.vllm_server import VllmServer

from . import scrape
from .settings import BLOCK_SIZE, Settings
from .systems import drop_page_cache, stop_store

# Shaped like the small model's (never the instance's own: these lookups must miss).
PROBE_NAMESPACE = StoreNamespace(
    model="bench-reuse-probe", weights_id="probe", kv_dtype="float32", block_size=BLOCK_SIZE,
    num_layers=8, num_kv_heads=2, head_dim=64, kv_layout="probe",
)  # fmt: skip


def lookup_on_miss(store: dict[str, Any], settings: Settings) -> dict[str, Any]:
    client = StoreClient(StoreConfig.from_dict(store))
    try:
        client.register(PROBE_NAMESPACE)
        samples: list[float] = []
        misses = 0
        for i in range(50 + settings.lookup_calls):  # the first 50 warm the socket up
            hashes = [os.urandom(32) for _ in range(settings.lookup_blocks)]
            start = time.perf_counter()
            hit = client.lookup(PROBE_NAMESPACE, hashes)
            elapsed = time.perf_counter() - start
            if i >= 50:
                samples.append(1000 * elapsed)
                misses += hit.num_blocks == 0
        stats = client.stats()
        failed = client.failed_calls
    finally:
        client.close()
    return {
        "calls": len(samples),
        "blocks_per_call": settings.lookup_blocks,
        "missed": misses,
        "failed_calls": failed,
        "store_entries": {t.tier: t.entries for t in (stats.host, stats.disk) if t}
        if stats else {},
        **{f"p{q}_ms": float(np.percentile(samples, q)) for q in (50, 90, 99)},
    }  # fmt: skip


DISK_LOAD_BLOCKS = 16  # a 2048-token document's blocks
DISK_LOAD_BLOCK_BYTES = 1 << 20  # the small model's block of 128 tokens (float32)
DISK_LOAD_PAIRS = 12
ENGINE_STEP_S = 0.015  # between the scheduler's lookup and the worker's get: a step or more


def disk_load_readahead(root: Path) -> dict[str, Any]:
    store = {"host_gib": 0, "disk_path": str(root / "disk"), "disk_gib": 1,
             "socket_dir": str(root / "sock"), "timeout_ms": 3000}  # fmt: skip
    client = StoreClient(StoreConfig.from_dict(store))
    samples: dict[str, list[float]] = {"after_lookup": [], "no_lookup": [], "lookup": []}
    try:
        client.register(PROBE_NAMESPACE)
        hashes = [os.urandom(32) for _ in range(DISK_LOAD_BLOCKS)]
        items = [(h, os.urandom(DISK_LOAD_BLOCK_BYTES)) for h in hashes]
        if client.put_many(PROBE_NAMESPACE, items) != DISK_LOAD_BLOCKS:
            return {"error": "the store did not take the blocks"}
        for _ in range(DISK_LOAD_PAIRS):
            for arm in ("after_lookup", "no_lookup"):
                drop_page_cache(root / "disk")
                time.sleep(0.2)
                if arm == "after_lookup":
                    start = time.perf_counter()
                    hit = client.lookup(PROBE_NAMESPACE, hashes)
                    samples["lookup"].append(1000 * (time.perf_counter() - start))
                    if hit.disk_blocks != DISK_LOAD_BLOCKS:
                        return {"error": f"lookup found {hit}"}
                    time.sleep(ENGINE_STEP_S)
                start = time.perf_counter()
                got = client.get_many(PROBE_NAMESPACE, hashes)
                samples[arm].append(1000 * (time.perf_counter() - start))
                if any(g is None for g in got):
                    return {"error": "a get missed"}
        stats = client.stats()
    finally:
        client.close()
        stop_store(store)
    out: dict[str, Any] = {
        "pairs": DISK_LOAD_PAIRS, "blocks": DISK_LOAD_BLOCKS,
        "block_bytes": DISK_LOAD_BLOCK_BYTES, "step_s": ENGINE_STEP_S,
        "readahead_blocks": stats.readahead_blocks if stats else None,
    }  # fmt: skip
    for arm, values in samples.items():
        out[arm] = {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90)}
        out[arm]["mean_ms"] = sum(values) / len(values)
    return out


# After a round: the store's puts are settled once they stopped growing for this long;
# then a pause, so the next round's instance does not share the cores with the last
# one's tail (vLLM's worker spins up to 1 s after its last step).
SETTLED_S = 1.0
PAUSE_S = 2.0
DRAIN_MAX_S = 60.0


def step_time_paired(
    servers: dict[str, VllmServer], settings: Settings, store: dict[str, Any] | None,
    seed: int = 500,
) -> dict[str, Any]:  # fmt: skip
    """``step_rounds`` rounds of the fixed load per system, the systems alternating
    (each round's prompts the same for both, new each round); per system and round,
    the engine's mean step time (ms) and the load's wall time (s)."""
    rows: dict[str, list[dict[str, Any]]] = {system: [] for system in servers}
    order = list(servers)
    for round_ in range(settings.step_rounds):
        rng = random.Random(seed + round_)
        prompts = [[rng.randrange(256) for _ in range(settings.step_prompt_tokens)]
                   for _ in range(settings.step_requests)]  # fmt: skip
        for system in order if round_ % 2 == 0 else order[::-1]:
            rows[system].append(
                _round(servers[system], settings, prompts, store if system == "store" else None)
            )
            time.sleep(PAUSE_S)
    return {system: {"rounds": rounds, "paired": True,
                     "engine_step_ms": sum(r["engine_step_ms"] for r in rounds) / len(rounds),
                     "wall_s": sum(r["wall_s"] for r in rounds) / len(rounds)}
            for system, rounds in rows.items()}  # fmt: skip


def _round(
    server: VllmServer, settings: Settings, prompts: list[list[int]], store: dict[str, Any] | None
) -> dict[str, Any]:
    before = scrape.instance_counters(server)
    puts_before = _store_puts(store)
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(settings.step_concurrency) as pool:
        answered = list(pool.map(lambda p: _complete(client, server.url, settings, p), prompts))
    wall_s = time.perf_counter() - start
    grown = scrape.delta(before, scrape.instance_counters(server))
    drain_s, puts = _drain(store, puts_before)
    steps = grown["itl_count"]
    return {
        "wall_s": wall_s,
        "engine_step_ms": 1000 * grown["itl_sum_s"] / steps if steps else float("nan"),
        "token_gaps": steps,
        "output_tokens": sum(answered),
        # The store process's count: the connector's reaches /metrics with a later step.
        "blocks_stored": puts,
        "saves_skipped": grown.get("store_saves_skipped", 0.0),
        "saves_already_stored": grown.get("store_saves_already_stored", 0.0),
        "save_drain_s": drain_s,
        "loadavg_1m": os.getloadavg()[0],
    }


def _store_puts(store: dict[str, Any] | None) -> float:
    """Blocks the store process's host tier accepted so far (0 without a store)."""
    if store is None:
        return 0.0
    return scrape.store_counters(store).get("host_puts", 0.0)


def _drain(store: dict[str, Any] | None, puts_before: float) -> tuple[float, float]:
    """(seconds until the store's puts settled after the load, blocks it accepted)."""
    if store is None:
        return 0.0, 0.0
    start = last_change = time.monotonic()
    puts = _store_puts(store)
    while time.monotonic() - last_change < SETTLED_S and time.monotonic() - start < DRAIN_MAX_S:
        time.sleep(0.1)
        now = _store_puts(store)
        if now != puts:
            puts, last_change = now, time.monotonic()
    return last_change - start, puts - puts_before


def _complete(client: httpx.Client, url: str, settings: Settings, prompt: list[int]) -> int:
    body = {"model": settings.served_name, "prompt": prompt, "temperature": 0,
            "max_tokens": settings.step_output_tokens, "ignore_eos": True}  # fmt: skip
    response = client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])
