"""Run one command so that none of its processes outlives it or the process that asked.

    python -m pd.guardian --life-fd R --report-fd W [--lock PATH] [--name NAME]

The caller writes CMD as the first line of the life pipe (a JSON list), so CMD's
arguments appear on CMD's command line only, never on the guardian's.

``VllmServer`` starts every ``vllm serve`` this way. It is two processes:

- a *shim*, the caller's direct child, that only waits for the guardian. Ray SIGKILLs
  an actor's direct children when the actor is killed; the shim absorbs that, so the
  guardian below it lives on to clean up.
- the *guardian*. It makes itself a child subreaper, so every process the command
  leaves behind (vLLM's EngineCore and workers when its API server dies) is reparented
  to it rather than to init. It launches CMD in a session of its own (CMD's pid is its
  process group's id) and writes that pid to the report fd. It watches the life fd,
  the read end of a pipe whose write end only the caller holds: EOF means the caller
  died, however it died (SIGKILL and the OOM killer included); a line ``stop GRACE_S``
  asks for a stop. When CMD exits, the caller dies, a stop is asked or SIGTERM
  arrives, it ends CMD's group and every descendant (SIGTERM and SIGCONT, SIGKILL after
  the grace), reaps them all, and only then exits, with CMD's exit status.

With ``--lock`` the guardian holds an exclusive flock on that file for its whole life,
taking it before it launches CMD (waiting at most ``--lock-wait-s``), so a restarted
instance never runs beside the processes of its previous incarnation. Standard
library only: it starts in milliseconds and imports nothing of vLLM's or Ray's.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

EXIT_LOCKED = 75  # EX_TEMPFAIL: a previous incarnation still holds the lock
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.2


def exit_code(status: int) -> int:
    """A wait status as a shell would report it (128 + N for death by signal N)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def descendants(root: int) -> set[int]:
    """Live (non-zombie) processes below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # it just ended
        state, ppid = stat[stat.rfind(b")") + 2 :].split()[:2]
        if state != b"Z":
            children.setdefault(int(ppid), []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            if pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


class Guardian:
    def __init__(self, life_fd: int, name: str) -> None:
        self._life_fd = life_fd
        self._life_buffer = b""
        self._name = name
        self._pid = os.getpid()
        self._child: int | None = None
        self._child_status: int | None = None
        self._terminated = False

    def run(self, report_fd: int, lock_path: Path | None, lock_wait_s: float) -> int:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the shim died: the caller is dying
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._ignore)
        os.setsid()  # a signal to the caller's group (a terminal's Ctrl-C) is not for us
        line = self._read_life()
        if line is None:
            return 0  # the caller died before it said what to run
        command: list[str] = json.loads(line)
        lock_fd = None
        if lock_path is not None:
            lock_fd = self._take_lock(lock_path, lock_wait_s)
            if lock_fd is None:
                return EXIT_LOCKED
        if self._asked_to_end():
            return 0
        self._child = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            setsid=True,  # its own group: the fault tests signal it as a whole
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # as Python found them
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
        )
        with contextlib.suppress(OSError):
            os.write(report_fd, f"{self._child}\n".encode())
        os.close(report_fd)
        grace_s = self._serve()
        self._end_all(grace_s)
        if lock_fd is not None:
            os.close(lock_fd)  # only now: nothing of this incarnation is left
        return exit_code(self._child_status) if self._child_status is not None else 0

    # --- life ------------------------------------------------------------------------

    def _serve(self, default_grace_s: float = 5.0) -> float:
        """Wait until CMD exits, the caller dies or asks for a stop; the grace to use."""
        while True:
            self._reap()
            if self._child_status is not None:
                return default_grace_s
            if self._terminated:
                return default_grace_s
            readable, _, _ = select.select([self._life_fd], [], [], _POLL_S)
            if readable:
                line = self._read_life()
                if line is None:  # EOF: the caller is gone
                    print(f"pd guardian: {self._name}: its owner died; stopping", flush=True)
                    return default_grace_s
                if line.startswith("stop"):
                    return float(line.split()[1]) if len(line.split()) > 1 else default_grace_s

    def _read_life(self) -> str | None:
        """The caller's next line; None once it is gone (EOF)."""
        while b"\n" not in self._life_buffer:
            try:
                data = os.read(self._life_fd, 65536)
            except OSError:
                return None
            if not data:
                return None
            self._life_buffer += data
        line, _, self._life_buffer = self._life_buffer.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _asked_to_end(self) -> bool:
        """Whether the caller died or asked for a stop (before CMD runs, both mean: don't)."""
        readable, _, _ = select.select([self._life_fd], [], [], 0)
        return self._terminated or bool(readable)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._terminated = True

    @staticmethod
    def _ignore(signum: int, frame: object) -> None:
        """A terminal's Ctrl-C is for the caller; the guardian ends when it does."""

    # --- ending ----------------------------------------------------------------------

    def _end_all(self, grace_s: float) -> None:
        """SIGTERM everything below us, SIGKILL what is left after ``grace_s``, reap it all."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._anything_left() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Repeat: a process may fork while we kill; a stuck (D state) one is waited for.
        hard_deadline = time.monotonic() + 60
        while self._anything_left() and time.monotonic() < hard_deadline:
            self._signal_all(signal.SIGKILL)
            time.sleep(0.1)

    def _signal_all(self, sig: int) -> None:
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._child, sig)
        for pid in descendants(self._pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)  # a stopped process must see the SIGTERM

    def _anything_left(self) -> bool:
        self._reap()
        if descendants(self._pid):
            return True
        self._reap()  # one that ended between the two looks
        return False

    def _reap(self) -> None:
        """Collect every exited child (orphans reparented to us included)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self._child:
                self._child_status = status

    # --- lock ------------------------------------------------------------------------

    def _take_lock(self, path: Path, wait_s: float) -> int | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            holder = _read_holder(fd)
            if not announced:
                print(
                    f"pd guardian: {self._name}: waiting for its previous incarnation "
                    f"(guardian pid {holder}) to end",
                    flush=True,
                )
                announced = True
            if time.monotonic() > deadline:
                print(
                    f"pd guardian: {self._name}: its previous incarnation (guardian pid "
                    f"{holder}) still holds {path} after {wait_s:.0f}s; not starting beside it",
                    file=sys.stderr,
                    flush=True,
                )
                os.close(fd)
                return None
            if self._asked_to_end():
                os.close(fd)
                return None
            time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self._pid}\n".encode(), 0)
        return fd


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    return "unknown"


def _prctl(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _shim(guardian: int) -> int:
    """Wait for the guardian and exit as it did; pass a SIGTERM on to it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(guardian, signal.SIGTERM))
    signal.signal(signal.SIGINT, Guardian._ignore)
    while True:
        try:
            _, status = os.waitpid(guardian, 0)
            return exit_code(status)
        except InterruptedError:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pd.guardian")
    parser.add_argument("--life-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--lock", type=Path)
    parser.add_argument("--lock-wait-s", type=float, default=120)
    parser.add_argument("--name", default="command")
    args = parser.parse_args(argv)
    for fd in (args.life_fd, args.report_fd):
        os.set_inheritable(fd, False)  # CMD must never hold the caller's pipes
    guardian = os.fork()
    if guardian:
        os.close(args.report_fd)  # the caller sees EOF once the guardian has reported
        os.close(args.life_fd)
        return _shim(guardian)
    code = Guardian(args.life_fd, args.name).run(args.report_fd, args.lock, args.lock_wait_s)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
