"""Each system on each workload: pd-serve started for the pair (fresh caches), the
trace replayed, the counters read around it, pd-serve torn down; then the report."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from pd.models import make_model
from pd.serve_process import PdServeProcess

from . import systems, workloads
from .pool import pooled
from .replay import replay
from .report import REQUESTS, write_report
from .settings import BLOCK_SIZE, Settings

SHARED_PREFIX_SEC_MULTIPLIER = 0.001  # its timestamps are the Poisson arrivals, in ms


def measure(
    system: str, workload: str, settings: Settings, workdir: Path
) -> dict[str, Any]:  # fmt: skip
    requests = workloads.requests_of(workload, settings)
    trace = workloads.write_trace(requests, workdir / f"{workload}.jsonl")
    blocks = settings.shared_prefix_engine_blocks if workload == "shared-prefix" else None
    multiplier = (settings.trace_sec_multiplier if workload == "conversation"
                  else SHARED_PREFIX_SEC_MULTIPLIER)  # fmt: skip
    logs = workdir / f"{system}-{workload}"
    logs.mkdir()
    # Debug level: kv_aware logs each route (written after it, outside its timing);
    # the timeline: each request's steps on every process (pd.transfer.timeline).
    env = {"PD_LOG_LEVEL": "DEBUG", "PD_TIMELINE": str(logs / "timeline.jsonl")}
    serve = PdServeProcess(systems.config(system, settings.served_name, blocks), workdir=logs,
                           env=env)  # fmt: skip
    try:
        serve.start().wait_ready()
        before = systems.counters(serve)
        load_before, start = os.getloadavg()[0], time.monotonic()
        result = replay(serve.url, settings.served_name, trace, len(requests), multiplier,
                        max(float(r["timestamp"]) for r in requests),
                        workdir / f"{system}-{workload}.json")  # fmt: skip
        # The last events reach the counters within a scrape; nothing else runs now.
        result["counters"] = systems.delta(before, systems.counters(serve))
        result["wall_s"] = time.monotonic() - start
        result["loadavg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
        result["engine_blocks"] = blocks
    finally:
        serve.stop()
    if "per_request" in result:  # the log is whole once pd-serve stopped
        result["per_request"]["routes"] = routes(serve.log_path)
    return result


ROUTE_LINE = re.compile(
    r"kv_aware: (\w+): (\d+) prompt tokens; decode (\S+) holds (\d+)"
    r"(?:; best prefill (\S+) holds (\d+), (\d+) queued)?"
)


def routes(log: Path) -> list[dict[str, Any]]:
    """kv_aware's debug lines in pd-serve's log, in the order it routed."""
    out = []
    for m in ROUTE_LINE.finditer(log.read_text(errors="replace")):
        decision, n, decode, held_d, prefill, held_p, queued = m.groups()
        out.append({"decision": decision, "prompt_tokens": int(n), "decode": decode,
                    "decode_holds": int(held_d), "prefill": prefill,
                    "prefill_holds": int(held_p) if held_p else None,
                    "prefill_queued": int(queued) if queued else None})  # fmt: skip
    return out


def run(
    settings: Settings, system_names: list[str], workload_names: list[str], out_dir: Path,
    command: str, merge: bool = False, repeat: int = 1,
) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    make_model("tiny")
    results: dict[str, Any] = {"commands": [], "rows": {}}
    if merge and (out_dir / "routing.json").exists():
        results = json.loads((out_dir / "routing.json").read_text())
    # routing.requests.json: per row, each request's TTFT, length, send time and route
    requests: dict[str, Any] = {}
    if merge and (out_dir / REQUESTS).exists():
        requests = json.loads((out_dir / REQUESTS).read_text())
    results["commands"].append(command)
    results["settings"] = settings.as_dict()
    results["block_size"] = BLOCK_SIZE
    results["ideal"] = {w: workloads.ideal_reuse(workloads.requests_of(w, settings), BLOCK_SIZE)
                        for w in workloads.WORKLOADS}  # fmt: skip
    results["machine"] = {"cpus": os.cpu_count()}
    failed = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    print(f"logs in {workdir}", flush=True)
    for workload in workload_names:
        # Interleaved (every system once, then again): each sees the machine's drift.
        # Per system: each run's row and its per-request results, kept apart.
        runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {
            system: [] for system in system_names
        }
        for attempt in range(repeat):
            for system in system_names:
                print(f"== {system} on {workload} ({attempt + 1}/{repeat})", flush=True)
                row = _measured(system, workload, settings, workdir / f"run{attempt}")
                if "error" in row:
                    failed.append(f"{system} on {workload} (run {attempt + 1})")
                    print(f"   failed: {row['error'][:300]}", flush=True)
                    kept = results["rows"].setdefault(workload, {}).get(system, {})
                    if not runs[system] and (not kept or "error" in kept):
                        # a failed run never replaces a measured row (--merge)
                        results["rows"][workload][system] = row
                        write_report(results, out_dir)
                    continue
                print(f"   TTFT p50 {row['p50_ttft_ms']:.0f} ms, p90 {row['p90_ttft_ms']:.0f} "
                      f"ms, {row['completed']}/{row['num_prompts']} done", flush=True)  # fmt: skip
                runs[system].append((row, row.pop("per_request", {})))
                done = runs[system]
                results["rows"].setdefault(workload, {})[system] = pooled(
                    [r for r, _ in done], [pr for _, pr in done]
                )
                # beside routing.json: each request of the run with the median p90
                requests.setdefault(workload, {})[system] = _median_run(done)
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / REQUESTS).write_text(json.dumps(requests) + "\n")
                write_report(results, out_dir)  # after every run: a cut run keeps what it has
    return results, failed


def _measured(system: str, workload: str, settings: Settings, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(exist_ok=True)
    try:
        return measure(system, workload, settings, workdir)
    except Exception as e:
        traceback.print_exc()
        return {"error": repr(e)[:500]}


def _median_run(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The per-request results of the run whose TTFT p90 is the median of the runs'."""
    ordered = sorted(runs, key=lambda run: run[0]["p90_ttft_ms"])
    return ordered[(len(ordered) - 1) // 2][1]
