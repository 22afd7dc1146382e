"""pd-serve as a child process: the one launcher for scripts and tests that drive a cluster.

``PdServeProcess`` runs ``pd-serve --config FILE`` as a user does, on a config written
to a temporary directory with a proxy port, a Ray dashboard port and a Ray temp dir of
its own (several pd clusters may share a host, and a second Ray driver started with
``ray_env`` finds this cluster and no other). It runs in its own process group;
``wait_ready`` polls the proxy's /health, bounded, and raises with the tail of the
pd-serve output; ``instances`` finds each instance's ``vllm serve`` process (name,
role, pid, URL); ``stop`` sends SIGINT (Ctrl-C) and SIGKILLs whatever is left;
``interrupt`` is Ctrl-C at a terminal (the whole process group, as often as asked).

``local_config`` is configs/local.yaml with overrides deep-merged in: the one way to
derive a cluster config. Single vLLM servers are pd.vllm_server.VllmServer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil  # a dependency of vLLM
import yaml

from pd.vllm_server import free_port

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key (neither is changed)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def local_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """configs/local.yaml with ``overrides`` deep-merged in."""
    return deep_merge(yaml.safe_load(LOCAL_CONFIG.read_text()), overrides or {})


@dataclass(frozen=True)
class VllmInstance:
    """One instance's ``vllm serve`` process; its process group holds the engine too."""

    name: str  # pd-prefill-0, ...
    role: str  # prefill | decode
    pid: int
    url: str

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGSTOP: it stops answering."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: it recovers."""
        self.signal(signal.SIGCONT)


class PdServeProcess:
    """``pd-serve --config FILE`` on ``config`` plus its own ports; ``start()`` launches it."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path | None = None,
        *,
        split_stderr: bool = False,
        command_prefix: list[str] | tuple[str, ...] = (),
        proxy_host: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``command_prefix`` runs pd-serve under a command (``ip netns exec HOST``: on a
        test host of scripts/test_hosts.py), its proxy listening on ``proxy_host``
        (default: the config's, loopback); ``env``: extra environment (a joined
        cluster's Ray settings)."""
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pd-serve-"))
        # split_stderr: pd-serve's stderr (its errors) to stderr_path, not into log_path.
        self.stderr_path = self.workdir / "pd-serve.stderr" if split_stderr else None
        self.command_prefix = list(command_prefix)
        self.port = free_port()
        self.url = f"http://{proxy_host or '127.0.0.1'}:{self.port}"
        proxy = {"port": self.port, **({"host": proxy_host} if proxy_host else {})}
        self.config = deep_merge(config, {"proxy": proxy, "ray": {"dashboard_port": free_port()}})
        self.config_path = self.workdir / "cluster.yaml"
        self.log_path = self.workdir / "pd-serve.log"
        # Short: Ray's socket paths under it must fit a Unix socket address.
        self.ray_tmpdir = tempfile.mkdtemp(prefix="pd-ray-", dir="/tmp")
        self.ray_env = {**os.environ, "RAY_TMPDIR": self.ray_tmpdir, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports_seen: set[int] = set()  # every vLLM port any instance ever served on

    @property
    def request_s(self) -> float:
        """timeouts.request_s: the proxy's per-request deadline."""
        return float(self.config["timeouts"]["request_s"])

    @property
    def connector(self) -> dict[str, Any]:
        """The config's connector section (deadlines of the KV transfer)."""
        return self.config["connector"]

    def start(self) -> PdServeProcess:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with contextlib.ExitStack() as files:  # the child keeps its own copies
            log = files.enter_context(open(self.log_path, "wb"))
            errors = files.enter_context(open(self.stderr_path, "wb")) if self.stderr_path else None
            self.proc = subprocess.Popen(
                [
                    *self.command_prefix,
                    str(Path(sys.executable).with_name("pd-serve")),
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=errors or subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.ray_env,
            )
        return self

    @property
    def pid(self) -> int:
        """pd-serve's pid (its process group's id too)."""
        if self.proc is None:
            raise RuntimeError("pd-serve was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 600) -> PdServeProcess:
        """Block until /health says "ok" (both roles in rotation; "degraded" serves on
        decode alone); raise with the output's tail if pd-serve exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"pd-serve exited {code}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"pd-serve not ready in {timeout_s:.0f}s:\n{self.log()}")

    def log(self, chars: int = 6000) -> str:
        """The tail of pd-serve's output (its own lines and Ray's)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no output)"

    def instance_log(self, name: str, chars: int = 6000) -> str:
        """The tail of instance ``name``'s log (pd-serve prints the folder it is in)."""
        found = re.search(r"\(logs in (\S+)\)", self.log(chars=10**7))
        if found is None:
            return "(pd-serve has not said where its logs are)"
        try:
            return (Path(found.group(1)) / f"{name}.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return f"(no log of {name})"

    def stderr(self) -> str:
        """What pd-serve wrote to stderr (with ``split_stderr``; else it is in ``log()``)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def wait_exit(self, timeout_s: float) -> int:
        """pd-serve's exit code once it ends by itself; kill it all after ``timeout_s``."""
        try:
            return self.proc.wait(timeout=timeout_s) if self.proc else -1
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def instances(self) -> dict[str, VllmInstance]:
        """The vLLM servers running now, by instance name (absent while restarting).

        Ray's raylet is pd-serve's child and the actors' workers are its children, so
        every ``vllm serve`` of this cluster (a process-group leader whose stdout is the
        instance's log file, named after the instance) is among pd-serve's descendants."""
        found = {}
        for proc in self.descendants():
            try:
                cmdline = proc.cmdline()
                if "--kv-transfer-config" not in cmdline or os.getpgid(proc.pid) != proc.pid:
                    continue
                name = Path(os.readlink(f"/proc/{proc.pid}/fd/1")).stem
            except (psutil.Error, OSError):
                continue
            kv_config = json.loads(cmdline[cmdline.index("--kv-transfer-config") + 1])
            role = {"kv_producer": "prefill", "kv_consumer": "decode"}[kv_config["kv_role"]]
            host = cmdline[cmdline.index("--host") + 1]
            port = int(cmdline[cmdline.index("--port") + 1])
            self.ports_seen.add(port)
            found[name] = VllmInstance(name, role, proc.pid, f"http://{host}:{port}")
        return found

    def resume_all(self) -> None:
        """SIGCONT every instance (a stopped one cannot drain or stop)."""
        for instance in self.instances().values():
            instance.resume()

    def proxy_connections(self) -> int:
        """TCP connections pd-serve holds to vLLM servers (any incarnation seen) or from
        clients to the proxy, open or half-closed (CLOSE_WAIT: the peer closed, the
        proxy never did)."""
        kept = {psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT}
        count = 0
        for conn in psutil.Process(self.pid).net_connections(kind="tcp"):
            if conn.status not in kept:
                continue
            to_vllm = conn.raddr and conn.raddr.port in self.ports_seen
            from_client = conn.laddr and conn.laddr.port == self.port
            count += bool(to_vllm or from_client)
        return count

    def rss_mib(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 120) -> int | None:
        """Send ``sig`` (Ctrl-C by default: pd-serve drains and stops everything) and wait;
        if it is still running after ``timeout_s``, SIGKILL it and all it started.
        Returns its exit code, or None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.resume_all()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def interrupt(self, times: int = 1, timeout_s: float = 180) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to pd-serve's process group, not to
        pd-serve alone (unlike ``stop``, nothing stopped is resumed first); ``times`` > 1:
        again each second, as an impatient user does. pd-serve's exit code; after
        ``timeout_s`` everything is killed and TimeoutExpired raised."""
        for n in range(times):
            if n:
                time.sleep(1)
            if self.running():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGINT)
        return self.wait_exit(timeout_s)

    def kill(self) -> None:
        """SIGKILL pd-serve, its process group and every process it started."""
        if self.proc is None:
            return
        for child in self.descendants():
            with contextlib.suppress(psutil.Error):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
