"""Several runs of one system on one workload as one row.

On two shared cores a single run's TTFT tail moves by 2x from run to run (the same
system, code and load), more than the policies differ. Repeated runs are pooled: the
percentiles of every request of every run, the counters summed (hit rates and routing
time over all runs), and each run's own percentiles kept to show the spread."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# Throughputs and durations: their mean over the runs
MEANS = ("request_throughput", "output_throughput", "total_token_throughput", "duration")
SUMS = ("completed", "failed", "num_prompts", "total_input_tokens", "wall_s")


def percentile(values: list[float], q: float) -> float:
    """numpy's (as vLLM's benchmark computes it); NaN for a run that measured nothing."""
    return float(np.percentile(values, q)) if values else math.nan


def _summed(counters: list[Any]) -> Any:
    """Counters of several runs added key by key (nested dicts of numbers)."""
    first = counters[0]
    if isinstance(first, dict):
        return {k: _summed([c[k] for c in counters]) for k in first}
    return sum(counters)


def pooled(rows: list[dict[str, Any]], per_request: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rows of several runs and their per-request results (TTFTs in
    seconds). A single run comes back as it was."""
    if len(rows) == 1:
        return rows[0]
    out: dict[str, Any] = {key: sum(r[key] for r in rows) for key in SUMS if key in rows[0]}
    out.update({k: sum(r[k] for r in rows) / len(rows) for k in MEANS if k in rows[0]})
    ttfts = [1000 * t for pr in per_request for t in (pr.get("ttfts") or []) if t]
    for q in PERCENTILES:
        out[f"p{q}_ttft_ms"] = percentile(ttfts, q)
    out["mean_ttft_ms"] = sum(ttfts) / len(ttfts) if ttfts else math.nan
    for key in ("p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms"):
        if key in rows[0]:  # per-run figures only: their median
            out[key] = percentile([r[key] for r in rows], 50)
    out["counters"] = _summed([r["counters"] for r in rows])
    out["engine_blocks"] = rows[0].get("engine_blocks")
    out["loadavg_1m"] = [r.get("loadavg_1m") for r in rows]
    out["runs"] = [
        {f"p{q}_ttft_ms": r[f"p{q}_ttft_ms"] for q in PERCENTILES} for r in rows
    ]  # fmt: skip
    return out
