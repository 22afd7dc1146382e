"""The connector's store halves (pd/connector/store_side.py) against a real store process.

No vLLM engine: the scheduler side sees stand-ins for vLLM's ``Request`` and
``KVCacheBlocks`` (only the fields it reads); the worker side moves real bytes between
CPU KV caches shaped like vLLM's and the store, through a real ``StoreClient``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from vllm.v1.request import RequestStatus

from pd.cluster.config import ConfigError, load_config
from pd.cluster.plan import make_plan
from pd.connector import store_side
from pd.connector.store_side import (
    StoreResults,
    StoreScheduler,
    StoreWorker,
    extra_store_config,
)
from pd.store.blocks import gather_block
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.transfer.config import PDConnectorConfig
from pd.transfer.metadata import StoreBlocks
from pd.transfer.stats import TransferCounters
from tests.harness.kv_layouts import BLOCK_SIZE, make_layout
from tests.store_helpers import block_hashes, namespace

NS = namespace(block_size=BLOCK_SIZE, kv_dtype="bfloat16", num_layers=3, head_dim=8)
WAIT_S = 30.0


@dataclass
class FakeRequest:
    request_id: str
    num_tokens: int
    block_hashes: list[bytes]
    num_computed_tokens: int = 0
    num_prompt_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    kv_transfer_params: dict | None = None  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or self.num_tokens


@dataclass
class FakeBlocks:
    ids: list[int] = field(default_factory=list)

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@pytest.fixture
def config(tmp_path: Path) -> Iterator[StoreConfig]:
    socket_dir = tempfile.mkdtemp(prefix="pdsc-", dir="/tmp")
    config = StoreConfig(
        host_gib=0.01, disk_path=str(tmp_path / "disk"), socket_dir=socket_dir, timeout_ms=2000
    )
    yield config
    pid = ping(config, 2000)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(socket_dir, ignore_errors=True)


def results_until(worker: StoreWorker, done) -> StoreResults:  # type: ignore[no-untyped-def]
    merged = StoreResults()
    deadline = time.monotonic() + WAIT_S
    while not done(merged):
        assert time.monotonic() < deadline, "timed out waiting for the store worker"
        got = worker.take_results()
        merged.finished_loads |= got.finished_loads
        merged.failed_block_ids |= got.failed_block_ids
        merged.copied_saves |= got.copied_saves
        time.sleep(0.02)
    return merged


def test_saved_blocks_load_into_other_blocks_of_another_cache(
    config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_side, "SAVE_CHUNK_BLOCKS", 3)  # the save goes as 2 puts
    hashes = block_hashes(4, seed="doc")
    source, source_caches = make_layout(seed=1)
    target, target_caches = make_layout(seed=None)
    saver = StoreWorker(StoreClient(config), NS, source, TransferCounters(), None)
    scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
    try:
        # A finished request of 4 full blocks and a partial one, in blocks 10..14.
        done = FakeRequest("a", num_tokens=4 * BLOCK_SIZE + 3, block_hashes=hashes)
        done.num_computed_tokens = done.num_tokens
        done.status = RequestStatus.FINISHED_STOPPED
        assert scheduler.request_finished(done, [10, 11, 12, 13, 14], reports_completion=True)
        loads, saves = scheduler.take()
        assert loads == []
        assert [s.block_ids for s in saves] == [(10, 11, 12, 13)]
        assert scheduler.holds_blocks  # vLLM keeps stepping until the copy is reported
        saver.submit([], saves)
        got = results_until(saver, lambda r: "a" in r.copied_saves)
        assert got.finished_loads == set()
        scheduler.saves_copied(got.copied_saves)
        assert not scheduler.holds_blocks
        assert scheduler.request_finished(done, [10, 11, 12, 13], True) is False  # known

        # Wait for the put (after the copy is reported), then a new request of the same
        # prompt: all 4 blocks offered, since its last token lies in the 5th.
        deadline = time.monotonic() + WAIT_S
        while StoreClient(config).lookup(NS, hashes).num_blocks < 4:
            assert time.monotonic() < deadline, "blocks never reached the store"
            time.sleep(0.05)
        fresh = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
        request = FakeRequest("b", num_tokens=4 * BLOCK_SIZE + 3, block_hashes=hashes)
        # The local prefix cache holds block 0: the store supplies blocks 1..3.
        assert fresh.get_num_new_matched_tokens(request, BLOCK_SIZE) == (3 * BLOCK_SIZE, True)
        fresh.update_state_after_alloc(request, FakeBlocks([7, 20, 21, 22, 23]), 3 * BLOCK_SIZE)
        loads, _ = fresh.take()
        assert loads == [StoreBlocks("b", tuple(hashes[1:4]), (20, 21, 22))]
        loader = StoreWorker(StoreClient(config), NS, target, TransferCounters(), None)
        try:
            loader.submit(loads, [])
            got = results_until(loader, lambda r: "b" in r.finished_loads)
            assert got.failed_block_ids == set()
        finally:
            loader.close()
        for name, cache in source_caches.items():
            for src, dst in ((11, 20), (12, 21), (13, 22)):
                assert torch.equal(cache[:, src], target_caches[name][:, dst]), (name, src)
    finally:
        saver.close()
        scheduler.close()


def test_the_last_prompt_token_is_never_offered(config: StoreConfig) -> None:
    hashes = block_hashes(2, seed="exact")
    layout, _ = make_layout(seed=2)
    worker = StoreWorker(StoreClient(config), NS, layout, TransferCounters(), None)
    try:
        assert StoreClient(config).put_many(
            NS, [(h, bytes(layout.bytes_per_block)) for h in hashes]
        )
        scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
        # Exactly two blocks of prompt: the second holds the last token, so one is offered.
        request = FakeRequest("c", num_tokens=2 * BLOCK_SIZE, block_hashes=hashes)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (BLOCK_SIZE, True)
        # A prompt inside its first block: nothing to offer.
        short = FakeRequest("d", num_tokens=BLOCK_SIZE, block_hashes=hashes[:1])
        assert scheduler.get_num_new_matched_tokens(short, 0) == (0, False)
        scheduler.close()
    finally:
        worker.close()


def test_a_block_gone_from_the_store_is_a_failed_block(config: StoreConfig) -> None:
    hashes = block_hashes(3, seed="gone")
    layout, _ = make_layout(seed=None)
    counters = TransferCounters()
    worker = StoreWorker(StoreClient(config), NS, layout, counters, None)
    try:
        client = StoreClient(config)
        client.register(NS)
        client.put_many(NS, [(hashes[0], bytes(layout.bytes_per_block))])
        # Block 1 was never stored (or evicted after the lookup), block 2 is fine but
        # of another layout's size: both fail, block 0 loads.
        client.put_many(NS, [(hashes[2], b"short")])
        load = StoreBlocks("e", tuple(hashes), (30, 31, 32))
        worker.submit([load], [])
        got = results_until(worker, lambda r: "e" in r.finished_loads)
        assert got.failed_block_ids == {31, 32}
        stats = counters.snapshot()
        assert stats is not None
        assert stats.data["store_load_failures"] == 2
        assert stats.data["store_blocks_loaded"] == 1
    finally:
        worker.close()


def test_a_request_aborted_while_loading_is_not_saved(config: StoreConfig) -> None:
    """vLLM marks an aborted request finished before ``request_finished``: what says
    its blocks are still being filled (here by a prefill instance's load, which the
    store did not offer) is the allocation with external tokens, until the load ends."""
    scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
    try:
        for request_id in ("loading", "loaded"):
            request = FakeRequest(
                request_id, num_tokens=3 * BLOCK_SIZE, block_hashes=block_hashes(3, request_id)
            )
            scheduler.update_state_after_alloc(
                request, FakeBlocks([1, 2, 3]), num_external_tokens=3 * BLOCK_SIZE
            )
        scheduler.loads_ended(["loaded"])
        for request_id, saved in (("loading", False), ("loaded", True)):
            request = FakeRequest(
                request_id, num_tokens=3 * BLOCK_SIZE, block_hashes=block_hashes(3, request_id)
            )
            request.num_computed_tokens = 3 * BLOCK_SIZE
            request.status = RequestStatus.FINISHED_ABORTED
            assert scheduler.request_finished(request, [1, 2, 3], reports_completion=True) is saved
        loads, saves = scheduler.take()
        assert loads == [] and [save.request_id for save in saves] == ["loaded"]
    finally:
        scheduler.close()


def test_save_decode_saves_the_blocks_decode_filled(config: StoreConfig) -> None:
    hashes = block_hashes(3, seed="chat")
    for save_decode, expected in ((False, 1), (True, 2)):
        scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=save_decode)
        try:
            # A 1.5-block prompt that decoded to 2.5 blocks.
            request = FakeRequest(
                "g", num_tokens=2 * BLOCK_SIZE + BLOCK_SIZE // 2, block_hashes=hashes[:2],
                num_prompt_tokens=BLOCK_SIZE + BLOCK_SIZE // 2,
            )  # fmt: skip
            request.num_computed_tokens = request.num_tokens - 1
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            assert scheduler.request_finished(request, [5, 6, 7], reports_completion=True)
            _, saves = scheduler.take()
            assert len(saves[0].block_ids) == expected
        finally:
            scheduler.close()


def test_a_full_save_queue_skips_and_counts(config: StoreConfig) -> None:
    layout, _ = make_layout(seed=3)
    counters = TransferCounters()
    worker = StoreWorker(StoreClient(config), NS, layout, counters, None)
    try:
        many = [
            StoreBlocks(f"s{i}", tuple(block_hashes(2, seed=f"q{i}")), (1, 2)) for i in range(200)
        ]
        worker.submit([], many)  # returns at once: the saver thread takes what fits
        got = results_until(worker, lambda r: len(r.copied_saves) == len(many))
        assert got.copied_saves == {s.request_id for s in many}  # every request is freed
        stats = counters.snapshot()
        assert stats is not None
        skipped = stats.data["store_saves_skipped"]
        assert 0 < skipped < 2 * len(many)
        assert skipped % 2 == 0  # whole requests are skipped
    finally:
        worker.close()


def test_cluster_store_section_reaches_every_instances_connector(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nstore: {host_gib: 0.5, disk_path: kv}\n")
    plan = make_plan(load_config(path), available_cores=[0, 1])
    for instance in plan.instances:
        args = instance.vllm_args
        kv = json.loads(args[args.index("--kv-transfer-config") + 1])
        store = kv["kv_connector_extra_config"]["store"]
        # The disk path is made absolute where the config is read.
        assert store == {"host_gib": 0.5, "disk_path": str((Path.cwd() / "kv").resolve())}
        parsed = PDConnectorConfig.from_extra_config(kv["kv_connector_extra_config"])
        assert extra_store_config(parsed.store) == StoreConfig.from_dict(store)
    path.write_text("model: {preset: tiny}\nstore: {host_gb: 1}\n")
    with pytest.raises(ConfigError, match="host_gb"):
        load_config(path)
    assert extra_store_config(None) is None
    assert extra_store_config({"host_gib": 0}) is None  # no tier: no store
    with pytest.raises(ValueError, match=r"store\.disk_gib"):
        extra_store_config({"disk_gib": -1})


class Tally:
    """A worker's counters summed over snapshots (each snapshot takes what it reads)."""

    def __init__(self, counters: TransferCounters) -> None:
        self._counters = counters
        self._totals: dict[str, float] = {}

    def __getitem__(self, name: str) -> float:
        stats = self._counters.snapshot()
        for key, value in (stats.data if stats is not None else {}).items():
            if isinstance(value, int | float):
                self._totals[key] = self._totals.get(key, 0) + value
        return self._totals.get(name, 0)


def stored_prefix(config: StoreConfig, hashes: list[bytes]) -> int:
    return StoreClient(config).lookup(NS, hashes).num_blocks


def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def test_a_save_sends_only_the_blocks_the_store_lacks(config: StoreConfig) -> None:
    hashes = block_hashes(4, seed="half-stored")
    layout, _ = make_layout(seed=4)
    client = StoreClient(config)
    client.register(NS)
    # Another instance stored the first two blocks (its bytes: another cache's).
    assert client.put_many(NS, [(h, bytes(layout.bytes_per_block)) for h in hashes[:2]]) == 2
    counters = TransferCounters()
    worker = StoreWorker(StoreClient(config), NS, layout, counters, None)
    try:
        worker.submit([], [StoreBlocks("h", tuple(hashes), (4, 5, 6, 7))])
        results_until(worker, lambda r: "h" in r.copied_saves)
        wait_for(lambda: stored_prefix(config, hashes) == 4, "the last two blocks stored")
        tally = Tally(counters)
        wait_for(lambda: tally["store_blocks_stored"] == 2, "the save counted")
        assert tally["store_saves_already_stored"] == 2
        assert tally["store_save_failures"] == 0
        # The blocks it held were not sent again: still the other instance's bytes.
        first, *_, last = client.get_many(NS, hashes)
        assert first == bytes(layout.bytes_per_block)
        assert last == bytes(gather_block(layout, 7))
    finally:
        worker.close()


def test_the_scheduler_never_saves_what_its_lookup_found(config: StoreConfig) -> None:
    hashes = block_hashes(3, seed="found")
    client = StoreClient(config)
    client.register(NS)
    assert client.put_many(NS, [(h, b"x" * 64) for h in hashes[:2]]) == 2
    scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)
    try:
        request = FakeRequest("k", num_tokens=3 * BLOCK_SIZE + 1, block_hashes=hashes)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (2 * BLOCK_SIZE, True)
        # vLLM found room for none of it (or loaded none): the request computed all.
        scheduler.update_state_after_alloc(request, FakeBlocks([1, 2, 3, 4]), 0)
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.FINISHED_STOPPED
        assert scheduler.request_finished(request, [1, 2, 3, 4], reports_completion=True)
        _, saves = scheduler.take()
        assert [s.block_hashes for s in saves] == [(hashes[2],)]
        assert [s.block_ids for s in saves] == [(3,)]
    finally:
        scheduler.close()


def test_puts_wait_while_the_engine_steps_but_copies_do_not(
    config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_side, "ENGINE_QUIET_S", 0.5)
    monkeypatch.setattr(store_side, "MAX_DEFER_S", 3600.0)
    hashes = block_hashes(2, seed="deferred")
    layout, _ = make_layout(seed=5)
    worker = StoreWorker(StoreClient(config), NS, layout, TransferCounters(), None)
    try:
        worker.submit([], [StoreBlocks("d", tuple(hashes), (8, 9))])
        # The engine steps every 20 ms: the blocks are copied (and freed) at once...
        copied: set[str] = set()
        stepping_until = time.monotonic() + 2.0
        while time.monotonic() < stepping_until:
            copied |= worker.take_results().copied_saves
            time.sleep(0.02)
        assert copied == {"d"}
        # ...but not put while it steps: never quiet for ENGINE_QUIET_S.
        assert stored_prefix(config, hashes) == 0
        # The engine goes quiet: the put goes out.
        wait_for(lambda: stored_prefix(config, hashes) == 2, "the deferred put")
    finally:
        worker.close()


def test_a_full_put_queue_skips_and_counts(
    config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, _ = make_layout(seed=6)
    # Room for one block of copied bytes: a two-block save never fits.
    monkeypatch.setattr(store_side, "PUT_QUEUE_MAX_BYTES", layout.bytes_per_block)
    hashes = block_hashes(2, seed="no-room")
    counters = TransferCounters()
    worker = StoreWorker(StoreClient(config), NS, layout, counters, None)
    try:
        worker.submit([], [StoreBlocks("p", tuple(hashes), (1, 2))])
        assert results_until(worker, lambda r: "p" in r.copied_saves).copied_saves == {"p"}
        tally = Tally(counters)
        wait_for(lambda: tally["store_saves_skipped"] == 2, "the skip counted")
        worker.close()  # puts what was queued: nothing
        assert stored_prefix(config, hashes) == 0
        assert tally["store_blocks_stored"] == 0
    finally:
        worker.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_putter_thread_runs_at_a_lower_priority(config: StoreConfig) -> None:
    layout, _ = make_layout(seed=None)
    worker = StoreWorker(StoreClient(config), NS, layout, TransferCounters(), None)
    try:
        (putter,) = [t for t in threading.enumerate() if t.name == "pd-store-put"]
        (copier,) = [t for t in threading.enumerate() if t.name == "pd-store-copy"]
        assert putter.native_id is not None and copier.native_id is not None
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        wait_for(
            lambda: (
                os.getpriority(os.PRIO_PROCESS, putter.native_id)
                == max(own, store_side.PUTTER_NICE)
            ),
            "the putter's nice value",
        )
        # The copier holds KV blocks until it is done: it keeps the engine's priority.
        assert os.getpriority(os.PRIO_PROCESS, copier.native_id) == own
    finally:
        worker.close()


def test_a_request_asked_about_again_reuses_its_lookup(config: StoreConfig) -> None:
    hashes = block_hashes(3, seed="asked-twice")
    client = StoreClient(config)
    client.register(NS)
    assert client.put_many(NS, [(h, b"x" * 64) for h in hashes]) == 3
    scheduler = StoreScheduler(StoreClient(config), NS, BLOCK_SIZE, save_decode=False)

    def store_lookups() -> int:
        stats = client.stats()
        assert stats is not None
        return stats.lookups

    try:
        request = FakeRequest("r", num_tokens=3 * BLOCK_SIZE + 1, block_hashes=hashes)
        before = store_lookups()
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK_SIZE, True)
        # No room for it this step: vLLM asks again next step, and the step after.
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK_SIZE, True)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK_SIZE, True)
        assert store_lookups() == before + 1
        # Another starting point is another question.
        assert scheduler.get_num_new_matched_tokens(request, BLOCK_SIZE) == (2 * BLOCK_SIZE, True)
        assert store_lookups() == before + 2
        # Allocated, then preempted and asked again: the store is asked afresh.
        scheduler.update_state_after_alloc(request, FakeBlocks([1, 2, 3, 4]), 2 * BLOCK_SIZE)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK_SIZE, True)
        assert store_lookups() == before + 3
    finally:
        scheduler.close()
