"""scripts/child_process.py: a child that dies is an error carrying its reason, never a hang.

Real spawned processes and real pipes; the children below are the functions they run.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection

import pytest

from scripts.child_process import ChildFailed, ChildProcess

# Long enough never to be what ends a test: a failure must come from the child's death.
PATIENT_S = 120


def echo(conn: Connection, greeting: str) -> None:
    conn.send(greeting)
    while (message := conn.recv()) is not None:
        conn.send(message * 2)


def raise_at_start(conn: Connection) -> None:
    raise ValueError("no such lease method")


def exit_at_start(conn: Connection) -> None:
    os._exit(3)


def send_and_exit(conn: Connection) -> None:
    conn.send("last words")
    os._exit(0)


def send_pid_then_wait(conn: Connection) -> None:
    conn.send(os.getpid())
    conn.recv()
    time.sleep(PATIENT_S)


def stay_silent(conn: Connection) -> None:
    time.sleep(PATIENT_S)


def test_messages_go_both_ways_and_the_child_ends() -> None:
    with ChildProcess(echo, "hello") as child:
        assert child.recv(timeout_s=PATIENT_S) == "hello"
        child.send(21)
        assert child.recv(timeout_s=PATIENT_S) == 42
        child.send(None)
    assert child.exitcode == 0


def test_a_child_that_raises_fails_with_its_traceback() -> None:
    with ChildProcess(raise_at_start) as child, pytest.raises(ChildFailed) as failed:
        child.recv(timeout_s=PATIENT_S)
    assert "ValueError: no such lease method" in str(failed.value)
    assert "raise_at_start" in str(failed.value)


def test_a_child_that_exits_without_a_word_fails_with_its_exit_code() -> None:
    with ChildProcess(exit_at_start) as child, pytest.raises(ChildFailed, match="exit code 3"):
        child.recv(timeout_s=PATIENT_S)


def test_a_message_sent_just_before_exiting_is_delivered() -> None:
    with ChildProcess(send_and_exit) as child:
        assert child.recv(timeout_s=PATIENT_S) == "last words"
        with pytest.raises(ChildFailed, match="exit code 0"):
            child.recv(timeout_s=PATIENT_S)


def test_a_child_killed_while_we_wait_fails_the_wait() -> None:
    with ChildProcess(send_pid_then_wait) as child:
        pid = child.recv(timeout_s=PATIENT_S)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ChildFailed, match=f"exit code -{signal.SIGKILL.value}"):
            child.recv(timeout_s=PATIENT_S)


def test_a_silent_child_times_out_and_is_ended() -> None:
    child = ChildProcess(stay_silent)
    with pytest.raises(ChildFailed, match=r"sent nothing for 0\.5 s"):
        child.recv(timeout_s=0.5)
    child.close(timeout_s=0.5)
    assert child.exitcode == -signal.SIGKILL.value
