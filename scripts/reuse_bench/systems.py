"""The two systems compared, each one plain ``vllm serve`` instance on both cores with
the same model, engine arguments and (tight) KV cache:

store   pd's connector with the node's KV store ("store" in kv_connector_extra_config:
        host tier and disk tier), as README's KV reuse section runs it
vllm    the same instance without a connector: vLLM's own prefix cache alone
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from pd.store.config import StoreConfig
from pd.store.spawn import ping
from pd.vllm_server import VllmServer

from .settings import Settings

SYSTEMS = ("store", "vllm")


def store_config(settings: Settings, root: Path) -> dict[str, Any]:
    """The store's settings; ``root`` short: the socket path is at most 107 bytes."""
    return {
        "host_gib": settings.host_gib,
        "disk_path": str(root / "disk"),
        "disk_gib": settings.disk_gib,
        "socket_dir": str(root / "sock"),
        # Generous: on this shared machine a busy moment must not turn calls into misses.
        "timeout_ms": 3000,
    }


def start(
    system: str, settings: Settings, model: Path, workdir: Path, store: dict[str, Any],
    log_name: str,
) -> VllmServer:  # fmt: skip
    """Start ``system`` and wait until it is healthy."""
    args = settings.engine_args()
    if system == "store":
        kv = {"kv_connector": "PDConnector", "kv_connector_module_path": "pd.transfer.connector",
              "kv_role": "kv_both", "kv_connector_extra_config": {"store": store}}  # fmt: skip
        args += ["--kv-transfer-config", json.dumps(kv)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = VllmServer(
        f"reuse-{system}", str(model), args=args, env=env, log_path=workdir / f"{log_name}.log"
    )
    return server.start().wait_ready()


def stop_store(store: dict[str, Any], timeout_s: float = 30) -> None:
    """End the node's store process (the host tier goes with it, the disk tier stays)."""
    config = StoreConfig.from_dict(store)
    pid = ping(config, timeout_ms=2000)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while ping(config, timeout_ms=200) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"store process {pid} still answers {timeout_s:.0f}s after SIGTERM")
        time.sleep(0.2)


def drop_page_cache(disk_path: Path) -> int:
    """Ask the kernel to drop the disk tier's files from the page cache (no root needed:
    posix_fadvise per file, after writing it back), so that a restart reads the disk,
    not memory. Returns the number of files."""
    files = 0
    for path in disk_path.rglob("*.kv"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            files += 1
        finally:
            os.close(fd)
    return files
