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
    .venv/bin/python scripts/bench_reuse.py --parts trace,step  # rerun those, merged
                                                    # into --out-dir's reuse.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from reuse_bench.report import CHART, write_markdown
from reuse_bench.report import write_report as write_results
from reuse_bench.run import PARTS, part_of, run
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
    parser.add_argument(
        "--parts", default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)}; a subset replaces those parts "
        "of the reuse.json already in --out-dir and keeps the rest",
    )  # fmt: skip
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: a comma-separated subset of {','.join(PARTS)}")
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
    earlier = None
    if set(parts) != set(PARTS):
        if not (out_dir / "reuse.json").exists():
            parser.error(f"--parts {args.parts}: no reuse.json in {out_dir} to merge into")
        earlier = json.loads((out_dir / "reuse.json").read_text())
    command = " ".join([".venv/bin/python scripts/bench_reuse.py", *sys.argv[1:]])
    results, failed = run(SMOKE if args.smoke else FULL, command, parts)
    if earlier is not None:
        results = merge(earlier, results, parts)
    write_results(results, out_dir)
    print(f"wrote {out_dir / 'reuse.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def merge(earlier: dict[str, Any], rerun: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """``earlier`` with ``parts`` replaced by ``rerun``'s (their phases too); the rerun's
    command, time, machine and parts go to ``reruns``."""
    if earlier["settings"] != rerun["settings"]:
        raise SystemExit("--parts: the earlier reuse.json was run with other settings")
    merged = dict(earlier)
    if "docqa" in parts:
        merged["docqa"] = rerun["docqa"]
    if "trace" in parts:
        merged["trace"] = rerun["trace"]
    micro = dict(earlier.get("micro", {}))
    if "lookup" in parts:
        micro["lookup_on_miss"] = rerun["micro"].get("lookup_on_miss", {})
    if "diskload" in parts:
        micro["disk_load"] = rerun["micro"].get("disk_load", {})
    if "step" in parts:
        micro["step_time"] = rerun["micro"]["step_time"]
    merged["micro"] = micro
    kept = [p for p in earlier.get("phases", []) if p.get("part", part_of(p["phase"])) not in parts]
    rerun_phases = [{**p, "rerun": True} for p in rerun["phases"]]
    merged["phases"] = kept + rerun_phases
    merged["reruns"] = [*earlier.get("reruns", []), {
        "command": rerun["command"], "started": rerun["started"], "parts": list(parts),
        "machine": rerun["machine"]}]  # fmt: skip
    if rerun.get("errors"):
        merged["errors"] = [*earlier.get("errors", []), *rerun["errors"]]
    return merged


if __name__ == "__main__":
    sys.exit(main())
