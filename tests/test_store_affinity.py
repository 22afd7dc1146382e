"""The store's processes and threads are not left on the one core of whoever started
them (vLLM's worker pins its main thread, which starts them)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pd.connector.store_side import StoreWorker
from pd.store.affinity import _parse_list, allow_all_cpus, node_cpus
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ensure_server, ping
from pd.transfer.stats import TransferCounters
from tests.harness.kv_layouts import BLOCK_SIZE, make_layout
from tests.store_helpers import namespace

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(node_cpus()) < 2,
    reason="needs per-thread CPU affinity and at least 2 CPUs",
)
ONE_CPU = {min(node_cpus())}


@pytest.fixture
def config(tmp_path: Path) -> Iterator[StoreConfig]:
    socket_dir = tempfile.mkdtemp(prefix="pdaf-", dir="/tmp")
    yield StoreConfig(host_gib=0.01, socket_dir=socket_dir, timeout_ms=2000)
    pid = ping(StoreConfig(host_gib=0.01, socket_dir=socket_dir), 2000)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(socket_dir, ignore_errors=True)


def on_one_cpu(body: Callable[[], object]) -> object:
    """Run ``body`` in a thread pinned to one CPU, as vLLM pins its worker's."""
    out: list[object] = []

    def pinned() -> None:
        os.sched_setaffinity(0, ONE_CPU)
        out.append(body())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    return out[0]


def test_cpu_lists_parse() -> None:
    assert _parse_list("0-3,6\n") == {0, 1, 2, 3, 6}
    assert _parse_list("1") == {1}
    assert _parse_list("") == set()


def test_a_pinned_thread_gets_every_cpu_back() -> None:
    def unpinned() -> set[int]:
        assert os.sched_getaffinity(0) == ONE_CPU
        allow_all_cpus()
        return os.sched_getaffinity(0)

    assert on_one_cpu(unpinned) == node_cpus()


def test_the_store_process_started_by_a_pinned_thread_runs_on_every_cpu(
    config: StoreConfig,
) -> None:
    assert on_one_cpu(lambda: ensure_server(config, 10.0))
    pid = ping(config, 2000)
    assert pid is not None
    assert os.sched_getaffinity(pid) == node_cpus()


def test_the_store_worker_threads_run_on_every_cpu(config: StoreConfig) -> None:
    layout, _ = make_layout(seed=None)
    ns = namespace(block_size=BLOCK_SIZE, kv_dtype="bfloat16", num_layers=3, head_dim=8)
    worker = on_one_cpu(
        lambda: StoreWorker(StoreClient(config), ns, layout, TransferCounters(), None)
    )
    assert isinstance(worker, StoreWorker)
    try:
        names = ("pd-store-load", "pd-store-copy", "pd-store-put")
        threads = [t for t in threading.enumerate() if t.name in names]
        assert len(threads) == 3
        deadline = time.monotonic() + 30
        for thread in threads:
            assert thread.native_id is not None
            while os.sched_getaffinity(thread.native_id) != node_cpus():
                assert time.monotonic() < deadline, f"{thread.name} still pinned"
                time.sleep(0.02)
    finally:
        worker.close()
