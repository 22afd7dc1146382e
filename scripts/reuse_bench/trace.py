"""The conversation trace (../shared/traces/, Mooncake's, scaled) replayed as its README
says: ``vllm bench serve --dataset-name timed_trace`` with ``PYTHONHASHSEED=0`` (the
prompt of each hash id is derived from Python's ``hash()``), so both systems see the
same prompts at the same times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .settings import BLOCK_SIZE, TRACE, Settings

CHUNK_TOKENS = 16  # tokens per hash id in this trace (its README)
KEPT = ("completed", "failed", "num_prompts", "duration", "request_throughput",
        "output_throughput", "total_token_throughput", "total_input_tokens",
        "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms")  # fmt: skip


def replay(url: str, model: Path, settings: Settings, out: Path) -> dict[str, Any]:
    """``vllm bench serve``'s figures for the trace, or {"error": why}."""
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", settings.served_name, "--tokenizer", str(model),
        "--dataset-name", "timed_trace", "--dataset-path", str(TRACE),
        "--timed-trace-chunk-hash-size", str(CHUNK_TOKENS),
        "--timed-trace-sec-multiplier", str(settings.trace_sec_multiplier),
        "--num-prompts", str(settings.trace_prompts), "--ignore-eos",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    arrivals_s = last_arrival_ms(settings.trace_prompts) * settings.trace_sec_multiplier
    limit_s = 3 * arrivals_s + 120  # past this the system is overloaded: say so
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {limit_s:.0f}s (overloaded)"}
    if run.returncode != 0:
        return {"error": (run.stdout + run.stderr)[-1500:]}
    result = json.loads(out.read_text())
    return {key: result[key] for key in KEPT if key in result}


def requests(limit: int) -> list[dict[str, Any]]:
    with TRACE.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(limit), strict=False)]


def last_arrival_ms(limit: int) -> float:
    return max(float(r["timestamp"]) for r in requests(limit))


def ideal_reuse(limit: int, block_tokens: int = BLOCK_SIZE) -> dict[str, float]:
    """The share of prompt tokens an unbounded cache could serve, counting as vLLM does:
    whole ``block_tokens`` blocks, never the prompt's last token, a block reusable when
    an earlier request had the same tokens up to its end (same leading chunks, each of
    the same length: the dataset derives a chunk's tokens from its hash id and size)."""
    seen: set[tuple[tuple[int, int], ...]] = set()
    reusable = total = 0
    for request in requests(limit):
        chunks, left = [], int(request["input_length"])
        for hash_id in request["hash_ids"]:
            if left <= 0:
                break
            size = min(CHUNK_TOKENS, left)
            chunks += [(int(hash_id), size)] * size  # one entry per token
            left -= size
        tokens = len(chunks)
        total += tokens
        loadable = (tokens - 1) // block_tokens
        hit = 0
        while hit < loadable and tuple(chunks[: (hit + 1) * block_tokens]) in seen:
            hit += 1
        reusable += hit * block_tokens
        for b in range(1, tokens // block_tokens + 1):
            seen.add(tuple(chunks[: b * block_tokens]))
    return {"prompt_tokens": total, "reusable_tokens": reusable,
            "share": reusable / total if total else 0.0}  # fmt: skip
