"""KV-aware routing benchmark: pd's routing policies with 2 prefill + 1 decode instances.

Starts pd-serve (the tiny model, 32-token blocks) once per system and workload with
``routing: kv_aware``, ``least_loaded``, ``round_robin``, and with one prefill instance
as the reference; replays the conversation trace of ../shared/traces/ and a generated
multi-tenant shared-prefix workload with ``vllm bench serve --dataset-name
timed_trace``; reads each instance's prefix-cache counters and the proxy's routing
metrics around each run. Dynamo's KV router is a row from ../shared/DYNAMO_ON_CPU.md
(not run here). Writes bench/results/routing.md, routing.json and routing.png. The
parts are in scripts/routing_bench/.

    .venv/bin/python scripts/bench_routing.py [--systems ...] [--workloads ...] [--merge]
        [--repeat N]   # N interleaved runs per row, pooled (scripts/routing_bench/pool.py)
    .venv/bin/python scripts/bench_routing.py --replot   # routing.png and .md from routing.json
    .venv/bin/python scripts/bench_routing.py --smoke    # one system, a few requests, a temp dir
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from routing_bench.report import CHART, write_markdown
from routing_bench.run import run
from routing_bench.settings import FULL, SMOKE
from routing_bench.systems import SYSTEMS
from routing_bench.workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="default: all "
                        "(smoke: kv_aware)")  # fmt: skip
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="default: both "
                        "(smoke: shared-prefix)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, help=f"default {RESULTS} (smoke: a temp dir)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of the "
                        "routing.json in --out-dir that this run does not redo")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per system and "
                        "workload, interleaved, pooled into one row (default 1)")  # fmt: skip
    parser.add_argument("--replot", action="store_true",
                        help=f"only redraw {CHART} and routing.md from routing.json")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="kv_aware on a few shared-prefix requests; a temp dir")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.replot:
        out_dir = args.out_dir or RESULTS
        if not (out_dir / "routing.json").exists():
            parser.error(f"--replot: no routing.json in {out_dir}")
        from routing_bench.chart import chart

        results = json.loads((out_dir / "routing.json").read_text())
        chart(results, out_dir / CHART)
        write_markdown(results, out_dir)
        print(f"wrote {out_dir / CHART} and {out_dir / 'routing.md'}")
        return 0
    if args.smoke:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-routing-smoke-"))
        if out_dir.resolve() == RESULTS:
            parser.error(f"--smoke never writes over {RESULTS}")
        systems = args.systems or ["kv_aware"]
        workloads = args.workloads or ["shared-prefix"]
    else:
        out_dir = args.out_dir or RESULTS
        systems = args.systems or list(SYSTEMS)
        workloads = args.workloads or list(WORKLOADS)
    command = " ".join([".venv/bin/python scripts/bench_routing.py", *sys.argv[1:]])
    _, failed = run(SMOKE if args.smoke else FULL, systems, workloads, out_dir, command,
                    merge=args.merge, repeat=args.repeat)  # fmt: skip
    print(f"wrote {out_dir / 'routing.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
