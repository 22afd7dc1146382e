"""A timed trace replayed with vLLM's own client, as ../shared/traces/README.md does:
``vllm bench serve --dataset-name timed_trace`` under ``PYTHONHASHSEED=0`` (each hash
id's tokens come from Python's ``hash()``), so every system sees the same prompts at
the same times. No ready-check request: pd-serve is healthy, and an extra prompt would
warm the caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pd.models import model_dir

from .settings import CHUNK_TOKENS

KEPT = ("completed", "failed", "num_prompts", "duration", "request_throughput",
        "output_throughput", "total_token_throughput", "total_input_tokens",
        "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms")  # fmt: skip
PER_REQUEST = ("input_lens", "start_times", "ttfts")


def replay(
    url: str, served_name: str, trace: Path, prompts: int, sec_multiplier: float,
    last_arrival_ms: float, out: Path,
) -> dict[str, Any]:  # fmt: skip
    """``vllm bench serve``'s figures, or {"error": why}."""
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", served_name, "--tokenizer", str(model_dir("tiny")),
        "--dataset-name", "timed_trace", "--dataset-path", str(trace),
        "--timed-trace-chunk-hash-size", str(CHUNK_TOKENS),
        "--timed-trace-sec-multiplier", str(sec_multiplier),
        "--num-prompts", str(prompts), "--ignore-eos", "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm", "--save-detailed",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    limit_s = 3 * last_arrival_ms * sec_multiplier + 120  # past this it is overloaded: say so
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {limit_s:.0f}s (overloaded)"}
    if run.returncode != 0:
        return {"error": (run.stdout + run.stderr)[-1500:]}
    result = json.loads(out.read_text())
    kept = {key: result[key] for key in KEPT if key in result}
    # Per request, in the trace's order: its prompt length, when it was sent and its TTFT.
    kept["per_request"] = {key: result.get(key) for key in PER_REQUEST}
    return kept
