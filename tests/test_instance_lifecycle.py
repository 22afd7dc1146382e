"""No process of an instance outlives it: the guardian (pd.guardian) and pd-serve.

The first tests run the guardian under ``VllmServer`` on plain commands (seconds, no
engines). The ``engines`` tests run pd-serve on configs/local.yaml as a user does and
end an instance's actor as Ray or the kernel would (ray.kill, SIGKILL of its worker),
then Ctrl-C a pd-serve still starting up: each time every process the instance had
(by process tree) is gone within a bounded time and none of its ports is still
listened on; a restarted instance answers as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from pd.guardian import EXIT_LOCKED
from pd.serve_process import PdServeProcess
from pd.vllm_server import VllmServer
from tests.harness import clusters
from tests.harness.openai_api import SERVED, client_of
from tests.harness.ray_driver import actor_info, kill_actor, wait_restarted
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 30  # the guardian's grace is 5 s; the rest is slack for a loaded machine
# A command that leaves an orphan in a session of its own (as vLLM's engine does when its
# API server dies), and one in its group, then waits.
ORPHANING = (
    "import subprocess, sys, time\n"
    "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
    "subprocess.Popen(['sleep', '1000'])\n"
    "print('started', flush=True)\n"
    "time.sleep(1000)\n"
)


# --- what is left of a set of processes -----------------------------------------------


Address = tuple[str, int]  # a listening socket's (ip, port)


def listening_sockets() -> set[tuple[int, Address]]:
    """Every listening inet socket on the machine, as (holder pid, address)."""
    return {
        (conn.pid, (conn.laddr.ip, conn.laddr.port))
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None
    }


@dataclass(frozen=True)
class Snapshot:
    """Processes (pid with start time, so a reused pid is not mistaken), the addresses
    they listen on, and who else on the machine listened on those addresses then."""

    processes: frozenset[tuple[int, float]]
    listening: frozenset[Address]
    # Holders outside the tree of the tree's addresses: a socket it shares with a process
    # that is not its descendant (an inherited fd), the leak the port check is for.
    shared_with: frozenset[tuple[int, Address]]

    @staticmethod
    def of(roots: list[psutil.Process]) -> Snapshot:
        procs: set[psutil.Process] = set()
        for root in roots:
            try:
                procs |= {root, *root.children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
        keys = set()
        for proc in procs:
            try:
                keys.add((proc.pid, proc.create_time()))
            except psutil.NoSuchProcess:
                continue
        pids = {pid for pid, _ in keys}
        sockets = listening_sockets()
        addresses = {address for pid, address in sockets if pid in pids}
        shared = {(pid, a) for pid, a in sockets if a in addresses and pid not in pids}
        return Snapshot(frozenset(keys), frozenset(addresses), frozenset(shared))

    def alive(self) -> list[str]:
        left = []
        for pid, created in self.processes:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        return left

    def ports_still_listened(self) -> list[str]:
        """The tree's sockets that a process outside it shared at the snapshot and still
        holds (the tree's own processes are ``alive``). A socket opened since on a freed
        port (a restarted instance in a reused Ray worker draws ports too) is not one."""
        now = listening_sockets()
        return [f"{ip}:{port} (pid {pid})" for pid, (ip, port) in self.shared_with & now]

    def wait_gone(self, what: str, timeout_s: float = GONE_WITHIN_S) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := self.alive() + self.ports_still_listened()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert not left, f"{what}: still there after {timeout_s}s: {left}"


# --- the guardian on plain commands ---------------------------------------------------


def plain_server(tmp_path: Path, script: str = ORPHANING, **kwargs) -> VllmServer:
    server = VllmServer("plain", "unused", log_path=tmp_path / "plain.log", **kwargs)
    server.command = [sys.executable, "-c", script]
    return server


def wait_pid(server: VllmServer, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while server.pid is None:
        assert time.monotonic() < deadline, f"never launched:\n{server.log_tail()}"
        time.sleep(0.05)
    return server.pid


def wait_started(server: VllmServer, children: int = 2) -> Snapshot:
    proc = psutil.Process(wait_pid(server))
    deadline = time.monotonic() + 30
    while len(proc.children()) < children:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    return Snapshot.of([psutil.Process(server.proc.pid)])


def test_orphans_of_a_crashed_command_are_ended(tmp_path):
    server = plain_server(tmp_path).start()
    left = wait_started(server)
    os.killpg(server.pid, signal.SIGKILL)  # its group dies; the setsid'd child escapes it
    server.proc.wait(timeout=GONE_WITHIN_S)
    assert server.proc.returncode == 128 + signal.SIGKILL  # the command's own status
    left.wait_gone("after the command was killed")


def test_stop_ends_everything_even_when_stopped(tmp_path):
    server = plain_server(tmp_path).start()
    left = wait_started(server)
    os.killpg(server.pid, signal.SIGSTOP)  # as the fault tests leave a group
    started = time.monotonic()
    server.stop(grace_s=20)
    assert time.monotonic() - started < 15, "SIGTERM waited for the grace (no SIGCONT?)"
    left.wait_gone("after stop()")


def test_death_of_the_owner_ends_everything(tmp_path):
    """SIGKILL of the process that started the server (as of a Ray actor's worker)."""
    owner_script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pd.vllm_server import VllmServer\n"
        f"server = VllmServer('owned', 'unused', log_path=Path({str(tmp_path)!r}) / 'o.log')\n"
        f"server.command = [sys.executable, '-c', {ORPHANING!r}]\n"
        "server.start()\n"
        "while server.pid is None:\n"
        "    time.sleep(0.05)\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(1000)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        server = psutil.Process(int(owner.stdout.readline()))
        deadline = time.monotonic() + 30
        while len(server.children()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        left = Snapshot.of([psutil.Process(owner.pid)])
        assert len(left.processes) >= 6  # owner, shim, guardian, command, two sleeps
    finally:
        owner.kill()
        owner.wait()
    left.wait_gone("after the owner was SIGKILLed")


def test_a_second_incarnation_waits_for_the_first(tmp_path):
    lock = tmp_path / "instance.lock"
    first = plain_server(tmp_path, lock_path=lock).start()
    left = wait_started(first)
    second = plain_server(tmp_path, lock_path=lock).start()
    try:
        time.sleep(1)
        assert second.pid is None, "started beside the first incarnation"
        first.kill()  # the first's guardian ends its orphans, then lets go of the lock
        assert left.alive() == [], "the lock was let go before everything had ended"
        wait_started(second)
    finally:
        second.stop(grace_s=5)
        first.stop(grace_s=5)


def test_an_incarnation_that_never_ends_is_a_clear_error(tmp_path):
    lock = tmp_path / "instance.lock"
    first = plain_server(tmp_path, lock_path=lock).start()
    wait_started(first)
    second = plain_server(tmp_path, lock_path=lock, lock_wait_s=1).start()
    try:
        assert second.proc.wait(timeout=30) == EXIT_LOCKED
        assert second.pid is None
        assert "previous incarnation" in second.log_tail()
    finally:
        first.stop(grace_s=5)


# --- pd-serve: instances whose actors die ---------------------------------------------


def instance_tree(serve: PdServeProcess, name: str) -> Snapshot:
    """Every process of instance ``name`` now: its actor's worker and all below it."""
    return Snapshot.of([psutil.Process(actor_info(serve, name)["actor_pid"])])


def complete(serve: PdServeProcess) -> str:
    """A greedy completion through the proxy."""
    reply = client_of(serve).completions.create(
        model=SERVED, prompt="The lifecycle of a process", max_tokens=12, temperature=0
    )
    return reply.choices[0].text


@dataclass
class Served:
    serve: PdServeProcess
    answer: str  # the greedy answer before any fault


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """configs/local.yaml as a user starts it, in a cluster of this module's own (not the
    session pool's): its tests kill actors and finally shut it down."""
    serve = PdServeProcess(clusters.LOCAL).start()
    try:
        serve.wait_ready()
        yield Served(serve, complete(serve))
    finally:
        serve.stop()


@pytest.mark.engines
def test_ray_kill_of_an_actor_ends_its_engine(served):
    serve = served.serve
    before = instance_tree(serve, "pd-prefill-0")
    assert len(before.processes) >= 5, "worker, shim, guardian, API server, EngineCore"
    kill_actor(serve, "pd-prefill-0")
    before.wait_gone("pd-prefill-0 after ray.kill of its actor")
    wait_restarted(serve, "pd-prefill-0", incarnation=1)
    serve.wait_ready()
    assert complete(serve) == served.answer


@pytest.mark.engines
def test_sigkill_of_an_actors_worker_ends_its_engine(served):
    serve = served.serve
    before = instance_tree(serve, "pd-decode-0")
    os.kill(actor_info(serve, "pd-decode-0")["actor_pid"], signal.SIGKILL)
    before.wait_gone("pd-decode-0 after kill -9 of its actor's worker")
    wait_restarted(serve, "pd-decode-0", incarnation=1)
    serve.wait_ready()
    assert complete(serve) == served.answer


@pytest.mark.engines
def test_shutdown_after_restarts_leaves_nothing(served):
    serve = served.serve
    everything = Snapshot.of([psutil.Process(serve.pid)])
    assert serve.stop(signal.SIGTERM, timeout_s=180) == 0, serve.log()
    everything.wait_gone("after pd-serve stopped")


@pytest.mark.engines
def test_ctrl_c_during_startup_ends_started_engines():
    """Ctrl-C, twice, of a pd-serve still waiting for an instance (decode, held stopped
    here so that start-up cannot finish first) ends every instance, the ready one
    included, even when the second Ctrl-C cuts pd-serve's own shutdown short."""
    serve = PdServeProcess(clusters.LOCAL).start()
    held = ready = False

    def decode_held_and_prefill_ready() -> bool:
        nonlocal held, ready
        assert serve.running(), serve.log()
        instances = serve.instances()
        decode, prefill = instances.get("pd-decode-0"), instances.get("pd-prefill-0")
        with contextlib.suppress(psutil.Error):
            if decode is not None and not held and psutil.Process(decode.pid).children():
                decode.stop()  # SIGSTOP of its group: its engine has started
                held = True
        if prefill is not None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{prefill.url}/health").status_code == 200
        return held and ready

    try:
        assert wait_for(decode_held_and_prefill_ready, 600, interval_s=1), (
            f"start-up did not get far:\n{serve.log()}"
        )
        everything = Snapshot.of([psutil.Process(serve.pid)])
        serve.interrupt(times=2)
        assert "OpenAI API at" not in serve.log(), "start-up finished before the Ctrl-C"
        everything.wait_gone("after Ctrl-C during start-up")
    finally:
        serve.stop()
