"""StoreClient against a store that hangs (SIGSTOPped): deadlines and reconnect back-off.

Real store process, real ipc:// socket, no vLLM. A stopped store keeps its socket, so
a call is accepted and then waits for a reply that does not come: the call's deadline
is what ends it. Waits are bounded; the lower bounds hold because a stopped store
cannot answer before it is continued.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from pd.store.client import (
    MAX_RETRY_INTERVAL_S,
    RETRY_INTERVAL_S,
    SLOW_TRANSFER_BYTES_PER_S,
    StoreClient,
)
from pd.store.config import StoreConfig
from tests.harness.waiting import wait_for
from tests.store_helpers import NAMESPACE, block_hashes
from tests.test_store_server import server_pid, stop_server
from tests.test_store_server import store as store  # the fixture

TIMEOUT_MS = 300
SLACK_S = 0.01  # poll() takes whole milliseconds


def state_of(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]


@pytest.fixture
def stopped(store: StoreConfig) -> Iterator[tuple[StoreClient, int]]:
    """A client that talked to the store once, and the store SIGSTOPped (state T)."""
    config = StoreConfig.from_dict({**store.to_dict(), "timeout_ms": TIMEOUT_MS})
    client = StoreClient(config)
    client.register(NAMESPACE)
    pid = server_pid(config)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        # SIGSTOP takes effect when the target next runs, which a loaded machine delays.
        assert wait_for(lambda: state_of(pid) == "T", timeout_s=30, interval_s=0.01)
        yield client, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()
        stop_server(config)


def test_default_timeout_is_a_second() -> None:
    assert StoreConfig().timeout_ms == 1000


def test_a_lookup_to_a_hung_store_misses_at_its_deadline(stopped) -> None:
    client, _ = stopped
    started = time.monotonic()
    assert client.lookup(NAMESPACE, block_hashes(4)).num_blocks == 0
    elapsed = time.monotonic() - started
    assert TIMEOUT_MS / 1000 - SLACK_S <= elapsed < TIMEOUT_MS / 1000 + 10
    assert client.failed_calls == 1
    started = time.monotonic()  # down now: the next call misses without waiting
    assert client.lookup(NAMESPACE, block_hashes(4)).num_blocks == 0
    assert time.monotonic() - started < TIMEOUT_MS / 1000


def test_a_put_gets_time_for_its_bytes(stopped) -> None:
    client, _ = stopped
    data = bytes(4 * 2**20)  # half a second at the slow rate, on top of timeout_ms
    hashes = block_hashes(2, "big")
    started = time.monotonic()
    assert client.put_many(NAMESPACE, [(h, data) for h in hashes]) == 0
    elapsed = time.monotonic() - started
    assert elapsed >= TIMEOUT_MS / 1000 + 2 * len(data) / SLOW_TRANSFER_BYTES_PER_S - SLACK_S


def test_reconnects_back_off_while_the_store_hangs_and_reset_when_it_answers(stopped) -> None:
    client, pid = stopped
    hashes = block_hashes(4)
    assert client.lookup(NAMESPACE, hashes).num_blocks == 0  # the failure
    assert client.retry_interval_s == RETRY_INTERVAL_S
    # Each failed reconnect (its ping times out) doubles the wait before the next.
    assert wait_for(
        lambda: (
            client.lookup(NAMESPACE, hashes) is not None
            and client.retry_interval_s >= 4 * RETRY_INTERVAL_S
        ),
        timeout_s=60,
        interval_s=0.05,
    )
    assert client.retry_interval_s <= MAX_RETRY_INTERVAL_S
    os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: client.stats() is not None, timeout_s=60, interval_s=0.05)
    assert client.retry_interval_s == RETRY_INTERVAL_S
    assert client.reconnects >= 1
