"""Real vLLM OpenAI servers for tests: pd's ``VllmServer`` with test defaults."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pd.vllm_server import VllmServer

__all__ = ["PD_KV_CONFIG", "started", "test_server"]

started = [0]  # vLLM servers started this session (reported by conftest)

PD_KV_CONFIG = {
    "kv_connector": "PDConnector",
    "kv_connector_module_path": "pd.transfer.connector",
    "kv_role": "kv_both",
}


def test_server(
    name: str,
    model: Path,
    *,
    extra_config: dict | None = None,
    connector: bool = True,
    cpu: str | None = None,
    args: tuple[str, ...] = (),
) -> VllmServer:
    """Start (not wait for) a float32 tiny-model server on loopback."""
    cli = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
           "--max-num-seqs", "16", *args]  # fmt: skip
    if connector:
        kv = {**PD_KV_CONFIG, "kv_connector_extra_config": extra_config or {}}
        cli += ["--kv-transfer-config", json.dumps(kv)]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu
    log_path = Path(tempfile.mkdtemp(prefix=f"pd-{name}-")) / "server.log"
    started[0] += 1
    return VllmServer(name, str(model), args=cli, env=env, log_path=log_path).start()


test_server.__test__ = False  # not a test, despite the name
