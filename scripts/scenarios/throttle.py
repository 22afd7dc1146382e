"""Slow an instance down without silencing it, from a process of its own (throttle_process.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from pd.serve_process import VllmInstance


class Throttle:
    """Slows an instance down without silencing it: throttle_process.py, as its own
    process, continues the instance's process group for ``run_s`` and stops it for
    ``stop_s``, in turns.

    Scenarios that need a request still running when a fault strikes throttle decode
    before they send it. Anything this client times by the events it has read runs
    late on a loaded machine: it reads late while decode runs unchecked, and streams
    finished before the fault (a pacer in the test's event loop; a throttle started at
    the first event read, which came 7 s late once, after a whole 1500-token stream)."""

    # Decode runs 1/21 of the time: at 250 tokens/s unthrottled a 1500-token stream
    # needs over 120 s. Stopped at most 0.6 s at a time, under the proxy's 2 s
    # health-check timeout, so health checks keep the instance in rotation.
    RUN_S, STOP_S = 0.03, 0.6

    def __init__(self, instance: VllmInstance) -> None:
        self.instance = instance
        self.process: subprocess.Popen[str] | None = None
        self.ended = False  # start() after end() must not restart it

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        """Starts the throttle, once."""
        if self.process is None and not self.ended:
            script = str(Path(__file__).with_name("throttle_process.py"))
            pgid, run_s, stop_s = self.instance.pid, self.RUN_S, self.STOP_S
            args = [sys.executable, script, str(pgid), str(run_s), str(stop_s)]
            self.process = subprocess.Popen(
                args, stdout=subprocess.PIPE, text=True, start_new_session=True
            )

    async def end(self, *, leave_stopped: bool = False) -> str:
        """Ends the throttle, leaving the instance running or (``leave_stopped``)
        stopped, and describes what it did."""
        self.ended = True
        if self.process is None:
            return f"{self.instance.name} was never throttled"
        self.process.send_signal(signal.SIGUSR1 if leave_stopped else signal.SIGTERM)
        report, _ = await asyncio.to_thread(self.process.communicate, timeout=10)
        self.process = None
        # Again here, in case the signal came before the throttle set its handlers up.
        if leave_stopped:
            self.instance.stop()
        else:
            self.instance.resume()
        if not report:
            return f"{self.instance.name}: the throttle ended before its first cycle"
        cycles, longest, scheduling = [*report.split(), "?", "?", "?"][:3]
        return (
            f"{self.instance.name} throttled for {cycles} cycles of {self.RUN_S * 1000:.0f} ms "
            f"run, {self.STOP_S * 1000:.0f} ms stopped (longest run window {longest} s, "
            f"throttle scheduling {scheduling})"
        )
