"""KV reuse benchmark: pd's KV store against vLLM's prefix cache alone.

Starts each system in turn as one plain ``vllm serve`` on both cores with the same
model (pd's ``small`` preset) and the same tight engine KV cache, and measures side by
side: long-document QA (cold, repeated, and after a restart of instance and store),
the conversation trace in ../shared/traces/ replayed with ``vllm bench serve``, a
store lookup that misses, and the engine's step time with saving on and off. Writes
bench/results/reuse.md, reuse.json and reuse.png. The parts are in scripts/reuse_bench/.

    .venv/bin/python scripts/bench_reuse.py
    .venv/bin/python scripts/bench_reuse.py --replot   # reuse.png (and .md) from reuse.json
    .venv/bin/python scripts/bench_reuse.py --smoke    # tiny model, a minute or two, a temp dir
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from reuse_bench.report import CHART, write_markdown
from reuse_bench.report import write_report as write_results
from reuse_bench.run import run
from reuse_bench.settings import FULL, SMOKE

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, help=f"default {RESULTS} (smoke: a temp dir)")
    parser.add_argument(
        "--replot", action="store_true",
        help=f"only redraw {CHART} and reuse.md from the reuse.json in --out-dir",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny model, small sizes, a trace prefix; results in a temp dir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        out_dir = args.out_dir or RESULTS
        if not (out_dir / "reuse.json").exists():
            parser.error(f"--replot: no reuse.json in {out_dir}")
        results = json.loads((out_dir / "reuse.json").read_text())
        from reuse_bench.chart import chart

        chart(results, out_dir / CHART)
        write_markdown(results, out_dir)
        print(f"wrote {out_dir / CHART} and {out_dir / 'reuse.md'}")
        return 0
    if args.smoke:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-reuse-smoke-"))
        if out_dir.resolve() == RESULTS:
            parser.error(f"--smoke never writes over {RESULTS}")
    else:
        out_dir = args.out_dir or RESULTS
    command = " ".join([".venv/bin/python scripts/bench_reuse.py", *sys.argv[1:]])
    results, failed = run(SMOKE if args.smoke else FULL, command)
    write_results(results, out_dir)
    print(f"wrote {out_dir / 'reuse.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
