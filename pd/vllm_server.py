"""One ``vllm serve`` process: start it, wait until healthy, read its log, stop it.

pd runs vLLM's own OpenAI server for every instance (under the instance's Ray actor,
or under a test), so every OpenAI feature vLLM supports passes through unchanged.
It runs under ``pd.guardian``, which ends every process of the server (the API server
and the EngineCore and workers it starts) when the server exits, when ``stop`` or
``kill`` is called, or when the process that started it dies, however it dies. The
API server leads its own process group, which holds vLLM's engine processes.
"""

from __future__ import annotations

import contextlib
import json
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
        lock_path: Path | None = None,
        lock_wait_s: float = 60,
    ) -> None:
        """``lock_path``: a file the guardian holds locked for the server's whole life; a
        second server with the same lock waits (at most ``lock_wait_s``) for the first
        to be gone entirely before it starts."""
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
        self.lock_path = lock_path
        self.lock_wait_s = lock_wait_s
        self.proc: subprocess.Popen | None = None  # the guardian's shim (see pd.guardian)
        self._pid: int | None = None
        self._life_w: int | None = None
        self._report_r: int | None = None

    def start(self) -> VllmServer:
        """Launch the server under its guardian (see ``pd.guardian``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        life_r, self._life_w = os.pipe()  # we hold the only write end: EOF = we died
        self._report_r, report_w = os.pipe()
        lock = ["--lock", str(self.lock_path), "--lock-wait-s", str(self.lock_wait_s)]
        guardian = [
            sys.executable, "-m", "pd.guardian", "--name", self.name,
            "--life-fd", str(life_r), "--report-fd", str(report_w),
            *(lock if self.lock_path else []),
        ]  # fmt: skip
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    guardian,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self._env,
                    pass_fds=(life_r, report_w),
                )
        finally:
            os.close(life_r)
            os.close(report_w)
        os.write(self._life_w, json.dumps(self.command).encode() + b"\n")
        os.set_blocking(self._report_r, False)
        return self

    @property
    def pid(self) -> int | None:
        """The vLLM API server's pid (its process group's id); None until it is launched
        (the guardian may first wait for a previous incarnation to end)."""
        if self._pid is None and self._report_r is not None:
            try:
                data = os.read(self._report_r, 64)
            except BlockingIOError:
                return None
            if data.strip():
                self._pid = int(data.split()[0])
            os.close(self._report_r)
            self._report_r = None
        return self._pid

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
        """SIGKILL the whole process group, as a crash would (the guardian then ends any
        process that left the group)."""
        if self.proc is None:
            return
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        elif self.proc.poll() is None and self._life_w is not None:
            with contextlib.suppress(OSError):  # not launched yet: tell it not to
                os.write(self._life_w, b"stop 0\n")
        self._wait_guardian(30)

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM every process of the server; SIGKILL what is left after ``grace_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self._life_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._life_w, f"stop {grace_s}\n".encode())
        self._wait_guardian(grace_s + 15)

    def _wait_guardian(self, timeout_s: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # never seen; do not leave it running anyway
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            self._close_life()  # EOF: the guardian ends whatever is left
            self.proc.kill()
            self.proc.wait()
        self._close_life()

    def _close_life(self) -> None:
        if self._life_w is not None:
            os.close(self._life_w)
            self._life_w = None

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as ``{"name{labels}": value}``, without model/engine labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return parse_prometheus(text)


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
