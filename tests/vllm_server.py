"""Start real vLLM OpenAI servers (``vllm serve``) as subprocesses for tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

VLLM = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
PD_KV_CONFIG = {
    "kv_connector": "PDConnector",
    "kv_connector_module_path": "pd.transfer.connector",
    "kv_role": "kv_both",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One ``vllm serve`` process on loopback; ``url`` is its base URL."""

    def __init__(
        self,
        name: str,
        model: Path,
        *,
        extra_config: dict | None = None,
        connector: bool = True,
        cpu: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix=f"pd-{name}-")) / "server.log"
        cmd = [
            VLLM, "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
            "--max-num-seqs", "16", *args,
        ]  # fmt: skip
        if connector:
            kv = {**PD_KV_CONFIG, "kv_connector_extra_config": extra_config or {}}
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        if cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 420) -> VllmServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as ``{"name{labels}": value}``, labels except model/engine."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            kept = [
                part
                for part in labels.rstrip("}").split(",")
                if part and not part.startswith(("model_name=", "engine="))
            ]
            samples[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
        return samples
