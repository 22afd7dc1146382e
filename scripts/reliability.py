"""Faults and load against one real pd-serve; writes docs/reliability.md.

    .venv/bin/python scripts/reliability.py [--duration-s 120] [--clients 64]
    .venv/bin/python scripts/reliability.py --smoke   # one fault, 4 clients for 5 s

Starts pd-serve on configs/local.yaml (with the short deadlines of
scripts/scenarios/faults/config.py, and its own proxy and Ray dashboard ports), runs
every fault scenario of scripts/scenarios/ (the same ones tests/test_faults.py runs)
and then the load scenario: ``--clients`` concurrent streaming clients for
``--duration-s`` seconds over loopback, sampling the pd-serve process's RSS each
second. Every request must complete or end in a clear error; none may be lost
(dropped, malformed, truncated) or hang; after each scenario no instance may hold KV
blocks and the proxy no extra connections. Exit code 0 when everything held, 1
otherwise; the report is written either way (``--smoke``: to a temporary file unless
``--output`` is given, so docs/reliability.md keeps the full run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd.serve_process import PdServeProcess, deep_merge, local_config  # noqa: E402
from scripts.scenarios.client import http_client  # noqa: E402
from scripts.scenarios.faults import FAULT_OVERRIDES, FAULT_SCENARIOS  # noqa: E402
from scripts.scenarios.load import MemoryTrace, load_scenario  # noqa: E402
from scripts.scenarios.report import LoadAverage, passed, render, transport_used  # noqa: E402
from scripts.scenarios.results import ScenarioResult  # noqa: E402
from scripts.scenarios.runner import run_scenario, warm_up  # noqa: E402

SMOKE_SCENARIO = "request_deadline"  # one fault that needs no restart: seconds, not minutes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=120, help="load run length")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument(
        "--request-s", type=float, default=30, help="timeouts.request_s (the per-request deadline)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="SCENARIO",
        help="run only these fault scenarios (default: all; 'none': load only)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick run: only {SMOKE_SCENARIO}, then 4 clients for 5 s, request_s 20",
    )
    parser.add_argument("--output", type=Path, help="default: docs/reliability.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.only, args.clients, args.duration_s, args.request_s = [SMOKE_SCENARIO], 4, 5, 20
        if args.output is None:
            args.output = Path(tempfile.mkdtemp(prefix="pd-reliability-")) / "reliability.md"
    if args.output is None:
        args.output = REPO / "docs" / "reliability.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = deep_merge(FAULT_OVERRIDES, {"timeouts": {"request_s": args.request_s}})
    scenarios = [s for s in FAULT_SCENARIOS if args.only is None or s.__name__ in args.only]
    memory = MemoryTrace()
    load = load_scenario(args.clients, args.duration_s, memory)

    started = time.monotonic()
    host_load = LoadAverage().start()
    serve = PdServeProcess(local_config(overrides)).start()
    print(f"reliability: pd-serve starting (log {serve.log_path})", flush=True)
    results: list[ScenarioResult] = []
    rss_start = rss_end = 0.0
    transport = "unknown"
    try:
        serve.wait_ready()
        baseline = asyncio.run(warm_up(serve))
        print(f"reliability: ready; idle proxy connections: {baseline}", flush=True)
        rss_start = serve.rss_mib()
        transport = asyncio.run(_transport(serve))
        for scenario in [*scenarios, load]:
            print(f"reliability: running {scenario.__name__}", flush=True)
            result = asyncio.run(run_scenario(serve, scenario, baseline))
            print(result.summary(), flush=True)
            results.append(result)
        rss_end = serve.rss_mib()
    finally:
        code = serve.stop()
        print(f"reliability: pd-serve stopped (exit code {code})", flush=True)

    host_load.stop()
    report = render(
        args,
        overrides,
        results,
        memory,
        (rss_start, rss_end),
        transport,
        time.monotonic() - started,
        host_load,
    )
    args.output.write_text(report)
    print(f"reliability: wrote {args.output}")
    return 0 if all(passed(r) for r in results) else 1


async def _transport(serve: PdServeProcess) -> str:
    async with http_client() as http:
        return await transport_used(serve, http)


if __name__ == "__main__":
    sys.exit(main())
