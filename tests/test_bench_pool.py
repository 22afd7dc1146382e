"""The routing benchmark's pooling of repeated runs (scripts/routing_bench/pool.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scripts.routing_bench.pool import percentile, pooled


def run_row(p50: float, p90: float, hits: float, routing_s: float) -> dict:
    return {
        "completed": 3, "failed": 0, "num_prompts": 3, "total_input_tokens": 30,
        "request_throughput": 1.0, "p50_ttft_ms": p50, "p90_ttft_ms": p90, "p99_ttft_ms": p90,
        "p50_tpot_ms": 5.0, "counters": {
            "instances": {"pd-prefill-0": {"hits": hits, "queries": 30.0}},
            "routing_s_sum": routing_s, "routing_count": 3.0,
            "routing_s": {"0.001": 2.0, "+Inf": 3.0},
        },
    }  # fmt: skip


def test_percentile_is_numpys_linear_interpolation():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))


def test_runs_pool_into_one_row_of_every_request():
    rows = [run_row(20, 30, 10, 0.003), run_row(200, 300, 20, 0.006)]
    per_request = [{"ttfts": [0.01, 0.02, 0.03]}, {"ttfts": [0.1, 0.2, 0.3]}]
    row = pooled(rows, per_request)
    every = [10.0, 20.0, 30.0, 100.0, 200.0, 300.0]
    assert row["p50_ttft_ms"] == pytest.approx(np.percentile(every, 50))
    assert row["p90_ttft_ms"] == pytest.approx(np.percentile(every, 90))
    assert row["completed"] == row["num_prompts"] == 6 and row["request_throughput"] == 1.0
    counters = row["counters"]  # summed: hit rates and routing time over both runs
    assert counters["instances"]["pd-prefill-0"] == {"hits": 30.0, "queries": 60.0}
    assert counters["routing_s_sum"] == pytest.approx(0.009) and counters["routing_count"] == 6
    assert counters["routing_s"] == {"0.001": 4.0, "+Inf": 6.0}
    assert [r["p90_ttft_ms"] for r in row["runs"]] == [30, 300]  # each run's own


def test_one_run_is_its_own_row():
    row = run_row(20, 30, 10, 0.003)
    assert pooled([row], [{"ttfts": [1.0]}]) is row
