"""How much CPU an idle NIXL agent burns: pd's agent against NIXL's default one.

NIXL 1.5.1's Python API sets the UCX progress thread's delay to 0, so an agent spins
on a whole core even with nothing to do. pd builds its agents with a delay. This
script starts each kind in its own process with a registered KV-cache-sized buffer,
waits, and reads the process's CPU time over an idle window (from /proc via
``resource.getrusage``), then prints % of one core for each.

    .venv/bin/python scripts/nixl_idle_cpu.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time


def idle_cpu_percent(kind: str, seconds: float, conn) -> None:
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
    time.sleep(1.0)  # let start-up settle
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    time.sleep(seconds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    conn.send(100 * cpu_s / (time.monotonic() - started))


def measure(kind: str, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=idle_cpu_percent, args=(kind, seconds, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    pd_percent = measure("pd", args.seconds)
    stock_percent = measure("stock", args.seconds)
    print(f"idle NIXL agent, % of one core over {args.seconds:g} s:")
    print(f"  pd (progress thread delay 1 ms): {pd_percent:5.1f}%")
    print(f"  NIXL default (delay 0):          {stock_percent:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
