"""Throttle a process group: continue it for ``run_s``, stop it for ``stop_s``, repeat.

    python scripts/scenarios/throttle_process.py PGID RUN_S STOP_S

Run as its own process so that the duty cycle does not depend on the test process
being scheduled: a process that only sleeps and signals is woken promptly even on a
loaded machine, while a test's event loop busy reading a stream may run late.

It ends on a signal and prints, on one line, the number of cycles, the longest window
the group actually ran, in seconds, and the scheduling it got:
- SIGTERM (or the group is gone): the group is left running;
- SIGUSR1: the group is left stopped, so a test can hold it still (or kill it) without
  a window in which it runs unthrottled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def wake_promptly() -> str:
    """Best effort: real-time scheduling (root, CAP_SYS_NICE), else a higher priority,
    else none; the process already sits in its own session (its own autogroup)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "fifo"
    with contextlib.suppress(OSError):
        os.nice(-10)
        return "nice-10"
    return "default"


def main(pgid: int, run_s: float, stop_s: float) -> None:
    scheduling = wake_promptly()
    cycles = 0
    longest_run_s = 0.0

    def finish(final: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, final)
        print(cycles, f"{longest_run_s:.3f}", scheduling, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, lambda *_: finish(signal.SIGCONT))
    signal.signal(signal.SIGUSR1, lambda *_: finish(signal.SIGSTOP))
    try:
        while True:
            began = time.monotonic()
            os.killpg(pgid, signal.SIGCONT)
            time.sleep(run_s)
            os.killpg(pgid, signal.SIGSTOP)
            longest_run_s = max(longest_run_s, time.monotonic() - began)
            cycles += 1
            time.sleep(stop_s)
    except ProcessLookupError:
        finish(signal.SIGCONT)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
