"""How much CPU an idle NIXL agent burns: pd's agent against NIXL's default one.

NIXL 1.5.1's Python API sets the UCX progress thread's delay to 0, so an agent spins
on a whole core even with nothing to do. pd builds its agents with a delay. This
script starts each kind in its own process with a registered KV-cache-sized buffer,
waits, and reads the process's CPU time over an idle window (from /proc via
``resource.getrusage``), then prints % of one core for each.

    .venv/bin/python scripts/nixl_idle_cpu.py [--seconds 5]
    .venv/bin/python scripts/nixl_idle_cpu.py --smoke   # a short window: checks it runs
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from multiprocessing.connection import Connection

from child_process import ChildProcess

SETTLE_S = 1.0  # start-up work of the agent, not counted


def idle_cpu_percent(conn: Connection, kind: str, seconds: float, settle_s: float) -> None:
    import torch

    from pd.transfer.layout import KVCacheLayout
    from pd.transfer.transport.nixl import NixlTransport

    cache = {"layer": torch.zeros((2, 64, 16, 8, 128), dtype=torch.bfloat16)}
    layout = KVCacheLayout.from_kv_caches(cache, 64, 16)
    if kind == "pd":
        transport = NixlTransport(layout, "127.0.0.1")
        transport.start(lambda *_: True)
    else:
        from nixl._api import nixl_agent

        agent = nixl_agent("stock")  # NIXL's defaults: UCX backend, progress thread delay 0
        agent.register_memory([cache["layer"]])
    time.sleep(settle_s)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    time.sleep(seconds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    conn.send(100 * cpu_s / (time.monotonic() - started))


def measure(kind: str, seconds: float, settle_s: float) -> float:
    with ChildProcess(idle_cpu_percent, kind, seconds, settle_s) as child:
        # Start-up (torch, NIXL, UCX) takes seconds, more on a loaded machine.
        percent: float = child.recv(timeout_s=120 + settle_s + seconds)
    return percent


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="idle window measured")
    parser.add_argument("--smoke", action="store_true", help="a 0.5 s window, little settling")
    args = parser.parse_args()
    from pd.transfer.transport.nixl import nixl_available

    if not nixl_available():
        print("NIXL does not import here (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    seconds, settle_s = (0.5, 0.2) if args.smoke else (args.seconds, SETTLE_S)
    pd_percent = measure("pd", seconds, settle_s)
    stock_percent = measure("stock", seconds, settle_s)
    print(f"idle NIXL agent, % of one core over {seconds:g} s:")
    print(f"  pd (progress thread delay 1 ms): {pd_percent:5.1f}%")
    print(f"  NIXL default (delay 0):          {stock_percent:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
