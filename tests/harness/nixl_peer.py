"""A NIXL peer in a child process, so a test can stop it (SIGSTOP) like a stalled prefill
worker or a cut link, and resume it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pd.transfer.transport import get_transport_class
from tests.harness.kv_layouts import make_layout


def serve_blocks(transport_name: str, conn: Any) -> None:
    """Child process: serve a seeded cache (``make_layout(seed=0)``) until killed."""
    layout, _ = make_layout(seed=0)
    server = get_transport_class(transport_name)(layout, "127.0.0.1")
    server.start(lambda *_: True)
    conn.send(server.metadata())
    time.sleep(600)


@dataclass
class PeerProcess:
    process: Any  # multiprocessing's SpawnProcess
    metadata: dict

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        time.sleep(0.3)  # kill() returns before the process is off the CPU

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def peer_process(transport_name: str) -> Iterator[PeerProcess]:
    """A started peer (its environment: this process's at the call)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=serve_blocks, args=(transport_name, child), daemon=True)
    process.start()
    try:
        assert parent.poll(60), "peer did not start"
        yield PeerProcess(process, parent.recv())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.join(10)
