"""Serving benchmark: pd against one vLLM instance and against stock vLLM P/D.

Starts each system in turn on the same model (pd's ``small`` preset), the same two
cores and the same load, drives it with vLLM's own client (``vllm bench serve``,
random dataset), tears it down completely, and writes bench/results/serving.md,
serving.json and serving.png. The systems are listed in scripts/serving_bench/systems.py,
the workloads in scripts/serving_bench/settings.py.

    .venv/bin/python scripts/bench_serving.py [--duration-s 30] [--systems ...]
    .venv/bin/python scripts/bench_serving.py --replot   # serving.png from serving.json
    .venv/bin/python scripts/bench_serving.py --smoke    # tiny model, seconds, a temp dir
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from serving_bench.chart import chart
from serving_bench.report import CHART, load_results
from serving_bench.run import run
from serving_bench.settings import FULL, SMOKE, WORKLOADS
from serving_bench.systems import ALL_SYSTEMS, DEFAULT_SYSTEMS, PD_DEFAULT

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, metavar="SYSTEM",
                        help=f"of {', '.join(ALL_SYSTEMS)} (default: all but the last "
                        f"{len(ALL_SYSTEMS) - len(DEFAULT_SYSTEMS)})")  # fmt: skip
    parser.add_argument("--workloads", nargs="+", help="default: all (`none`: only the "
                        "overhead probe)")  # fmt: skip
    parser.add_argument("--duration-s", type=float, help="of arrivals per workload "
                        f"(default {FULL.duration_s:g}; smoke {SMOKE.duration_s:g})")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, help=f"default {RESULTS} (smoke: a temp dir)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the serving.json in --out-dir that this run does not "
        "redo (other systems or workloads; both commands are recorded)",
    )
    parser.add_argument("--replot", action="store_true",
                        help=f"only redraw {CHART} from the serving.json in --out-dir")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=f"tiny model, one short workload, "
                        f"{PD_DEFAULT} unless --systems; results in a temp dir")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        out_dir = args.out_dir or RESULTS
        if not (out_dir / "serving.json").exists():
            parser.error(f"--replot: no serving.json in {out_dir}")
        chart(load_results(out_dir)["results"], out_dir / CHART)
        print(f"wrote {out_dir / CHART}")
        return 0
    settings = SMOKE if args.smoke else FULL
    if args.duration_s is not None:
        settings = dataclasses.replace(settings, duration_s=args.duration_s)
    if args.smoke:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-serving-smoke-"))
        if out_dir.resolve() == RESULTS:
            parser.error(f"--smoke never writes over {RESULTS}")
        # pd's default on CPU (ZMQ, first-token): it needs no NIXL
        systems = args.systems or [PD_DEFAULT]
    else:
        out_dir = args.out_dir or RESULTS
        systems = args.systems or DEFAULT_SYSTEMS
    workloads = args.workloads or [w.name for w in settings.workloads]
    unknown = set(workloads) - {w.name for w in (*WORKLOADS, *SMOKE.workloads)} - {"none"}
    if unknown:
        parser.error(f"unknown workloads: {' '.join(sorted(unknown))}")
    command = " ".join(["python scripts/bench_serving.py", *sys.argv[1:]])
    results, failed = run(systems, workloads, settings, out_dir, command, merge=args.merge)
    if args.smoke:  # every part must work, down to each request
        failed += [f"{s} on {w}" for w, rows in results.items() for s, r in rows.items()
                   if "error" in r and s not in failed]  # fmt: skip
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
