"""A function run in a spawned child process, talked to over a pipe, that cannot hang us.

The benchmark scripts run one side of each measurement in a child. A bare
``multiprocessing.Pipe`` hangs the parent forever when that child dies: the parent
keeps its own copy of the child's end, so ``recv`` never sees end-of-file. Here the
parent closes that copy right after the start, waits on the pipe and the child's exit
together, and turns a dead child into ``ChildFailed`` within moments, carrying the
child's traceback (sent over the pipe) or its exit code.

    with ChildProcess(serve, arg1, arg2) as child:   # serve(conn, arg1, arg2) in the child
        first = child.recv(timeout_s=60)
        child.send(...)
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any


class ChildFailed(RuntimeError):
    """The child raised, exited, or did not answer in time."""


class _ChildError:
    """Sent by the child instead of a message when its function raised."""

    def __init__(self, text: str) -> None:
        self.text = text


def _run_in_child(conn: Connection, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    try:
        target(conn, *args)
    except BaseException:
        with contextlib.suppress(OSError):  # a parent gone or not listening: nobody to tell
            conn.send(_ChildError(traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        conn.close()


class ChildProcess:
    """``target(conn, *args)`` in a spawned daemon process; ``conn`` is its pipe end."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.name = getattr(target, "__name__", "child")
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_run_in_child, args=(child_end, target, args), daemon=True)
        self._proc.start()
        child_end.close()  # ours gone, the pipe reports EOF once the child's end closes

    @property
    def exitcode(self) -> int | None:
        """None while the child runs; negative: the signal that ended it."""
        return self._proc.exitcode

    def send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError) as e:
            raise self._failure("closed its pipe") from e

    def recv(self, timeout_s: float) -> Any:
        """The child's next message; ``ChildFailed`` if it dies or is silent ``timeout_s``."""
        ready = wait([self._conn, self._proc.sentinel], timeout_s)
        # A child may send and exit at once: read what it sent before judging its exit.
        if self._conn in ready or self._conn.poll():
            try:
                message = self._conn.recv()
            except EOFError:
                raise self._failure("exited") from None
            if isinstance(message, _ChildError):
                self._proc.join(timeout=5)
                raise ChildFailed(f"{self.name} in the child process failed:\n{message.text}")
            return message
        if ready:
            raise self._failure("exited")
        raise ChildFailed(f"{self.name} in the child process sent nothing for {timeout_s:g} s")

    def close(self, timeout_s: float = 30) -> None:
        """Wait up to ``timeout_s`` for the child to finish, then make sure it is gone.

        Closing our end first ends a child still waiting for a message (it reads EOF).
        """
        self._conn.close()
        self._proc.join(timeout=timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failure(self, what: str) -> ChildFailed:
        self._proc.join(timeout=5)
        return ChildFailed(
            f"{self.name} in the child process {what} without an answer "
            f"(exit code {self._proc.exitcode}; its output above says why)"
        )
