"""One ``vllm serve`` process: start it, wait until healthy, read its log, stop it.

pd runs vLLM's own OpenAI server for every instance (as a child process of the
instance's Ray actor, or of a test), so every OpenAI feature vLLM supports passes
through unchanged, and vLLM's engine processes live and die in their own process
group, which ``stop`` and ``kill`` end as a whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    return shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))


class VllmServer:
    """``vllm serve MODEL --host HOST --port PORT *args`` with its output in ``log_path``."""

    def __init__(
        self,
        name: str,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path,
    ) -> None:
        self.name = name
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.command = [
            vllm_executable(), "serve", model, "--host", host, "--port", str(self.port), *args
        ]  # fmt: skip
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, die_with_parent: bool = False) -> VllmServer:
        """Launch the server. ``die_with_parent``: SIGTERM it if our process dies (Linux),
        so a killed Ray actor never leaves its vLLM server behind."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,  # its own process group: stop() ends vLLM's children
                preexec_fn=_terminate_with_parent if die_with_parent else None,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        if not self.running():
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 420) -> VllmServer:
        """Block until /health answers 200; raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited ({code}):\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(1)
        raise TimeoutError(f"{self.name} not ready in {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self._signal(signal.SIGKILL, wait_s=30)

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM the process group; SIGKILL what is left after ``grace_s``."""
        if not self._signal(signal.SIGTERM, wait_s=grace_s):
            self.kill()

    def _signal(self, sig: int, wait_s: float) -> bool:
        if self.proc is None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return False
        # vLLM's engine processes share the group; make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return True

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as ``{"name{labels}": value}``, without model/engine labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return parse_prometheus(text)


def _terminate_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def parse_prometheus(text: str) -> dict[str, float]:
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
