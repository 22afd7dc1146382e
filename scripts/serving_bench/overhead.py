"""pd's P/D overhead, one request at a time: its TTFT against the prefill instance's
own time for the same prompt, and where the sequential path's time goes on decode."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from pd.transfer import timeline

from . import scrape
from .systems import PdServe

SETTLE_S = 0.3  # before each timed request, after the previous one's bookkeeping
WARM_UP = 4  # the first requests warm both paths up; not counted


def pd_overhead(system: PdServe, url: str) -> dict[str, Any]:
    """In the first-token flow, requests whose first token went out with the prefill
    answer are reported apart from those that went sequentially (a first token that
    is part of a character, frequent with the random-weight byte-level model)."""
    served = system.settings.served_name
    count, length = system.settings.overhead_prompts, system.settings.overhead_prompt_len
    if count <= WARM_UP:
        raise ValueError(f"overhead_prompts must exceed the {WARM_UP} warm-up requests")
    prompts = [[(i * 31 + j * 7) % 250 for j in range(length)] for i in range(count)]
    own: list[float] = []
    ttft: list[float] = []
    second: list[float] = []
    handed_off: list[bool] = []
    legs: list[float] = []
    decode_side: list[dict[str, float]] = []
    windows: list[tuple[float, float]] = []  # wall clock: sent, first token event
    with httpx.Client(timeout=60) as client:
        # Interleaved, so that a machine getting faster or slower biases neither side.
        handoffs = scrape.first_token_handoffs(url)
        decode_sums = scrape.decode_sums(system.decode_url)
        for prompt in prompts:
            body: dict[str, Any] = {"model": served, "prompt": prompt, "max_tokens": 1}
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            client.post(f"{system.prefill_url}/v1/completions", json=body).raise_for_status()
            own.append(time.perf_counter() - started)
            shifted = [(t + 1) % 250 for t in prompt]  # no prefix-cache hit from above
            body = {"model": served, "prompt": shifted, "max_tokens": 2, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            time.sleep(SETTLE_S)
            wall_started = time.time()
            started = time.perf_counter()
            arrivals = []
            with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    # A token's event, even if its text is held back (part of a character)
                    if line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                        arrivals.append(time.perf_counter() - started)
            if not arrivals:
                raise RuntimeError(f"no token events in the answer ({response.status_code})")
            ttft.append(arrivals[0])
            windows.append((wall_started, wall_started + arrivals[0]))
            second.append(arrivals[-1])  # vLLM may send both tokens in one event
            # Scraped after the timed request: /metrics makes every instance render its own.
            before_request, handoffs = handoffs, scrape.first_token_handoffs(url)
            handed_off.append(handoffs[0] > before_request[0])
            legs.append(handoffs[2] - before_request[2])
            before_sums, decode_sums = decode_sums, scrape.decode_sums(system.decode_url)
            decode_side.append({k: decode_sums[k] - before_sums[k] for k in decode_sums})
        before = scrape.proxy_own_time_buckets(url, client)
        for prompt in prompts:
            body = {"model": served, "prompt": prompt[:64], "max_tokens": 1}
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
        own_time = scrape.bucket_quantile_ms(
            before, scrape.proxy_own_time_buckets(url, client), 0.5
        )
    own_ms = 1000 * statistics.median(own[WARM_UP:])

    def p50_ms(values: list[float], which: bool | None = None) -> float | None:
        kept = [v for v, h in zip(values[WARM_UP:], handed_off[WARM_UP:], strict=True)
                if which is None or h == which]  # fmt: skip
        return 1000 * statistics.median(kept) if kept else None

    ttft_ms = p50_ms(ttft)
    assert ttft_ms is not None  # count > WARM_UP
    # Paired: each request's TTFT minus its own prefill leg, as the proxy timed it.
    paired = [t - leg for t, leg in zip(ttft, legs, strict=True)]
    result: dict[str, Any] = {
        "prefill_own_p50_ms": own_ms, "pd_ttft_p50_ms": ttft_ms,
        "overhead_p50_ms": ttft_ms - own_ms, "proxy_own_p50_ms_at_most": own_time,
        "second_token_p50_ms": p50_ms(second), "paired_overhead_p50_ms": p50_ms(paired),
    }  # fmt: skip
    # Where the sequential path's time goes, as the decode instance saw each request.
    for key in scrape.DECODE_SUMS:
        result[f"decode_{key}_p50_ms"] = p50_ms([d[key] for d in decode_side], False)
    if system.timeline is not None and system.timeline.exists():
        marks = timeline.read(str(system.timeline))
        for key, path, which in (("timeline", TIMELINE_STEPS, False),
                                 ("first_token_timeline", FIRST_TOKEN_STEPS, True)):  # fmt: skip
            steps = timeline_steps(
                marks, windows[WARM_UP:], decode_side[WARM_UP:],
                [h == which for h in handed_off[WARM_UP:]],
                system.timeline.with_suffix(f".{key}.rows.json"), path,
            )  # fmt: skip
            if steps:
                result[key] = steps
    if any(handed_off):
        counted = handed_off[WARM_UP:]
        result["first_token_handoffs"] = f"{sum(counted)} of {len(counted)}"
        for which, key in ((True, "handed_off"), (False, "sequential")):
            if (ms := p50_ms(ttft, which)) is not None:
                result[f"{key}_overhead_p50_ms"] = ms - own_ms
                result[f"{key}_paired_overhead_p50_ms"] = p50_ms(paired, which)
                result[f"{key}_second_token_p50_ms"] = p50_ms(second, which)
    return result


# pd.transfer.timeline's marks on the sequential path, in the order they happen, each with what
# happened at that moment (the proxy's, the decode engine core's and its worker's).
TIMELINE_STEPS = (
    ("proxy_prefill_answer", "proxy got prefill's answer"),
    ("proxy_decode_sent", "proxy sent the decode leg"),
    ("sched_seen", "decode's scheduler saw the request (HTTP, API server, engine-core IPC)"),
    ("loads_sent", "that step's metadata carries the load"),
    ("load_submitted", "the worker got the load"),
    ("load_started", "pull started (load thread)"),
    ("load_ended", "pull ended"),
    ("result_queued", "result queued for the engine (the lease is released after)"),
    ("load_reported", "a step's get_finished reported it to vLLM"),
    ("completion_seen", "the scheduler processed that step's output"),
    ("compute_scheduled", "a step scheduled the prompt's last token"),
    ("first_token", "first token sampled (+ decode's own prefill time)"),
    ("proxy_first_chunk", "proxy got the first token"),
    ("client", "client got the first token"),
)


# The same for a request whose first token left with the prefill answer (first-token
# flow), from the client sending it: nothing of decode's is on this path.
FIRST_TOKEN_STEPS = (
    ("client_sent", "client sent the request"),
    ("proxy_prefill_sent", "proxy sent the prefill leg (HTTP in, validation, routing)"),
    ("proxy_prefill_answer", "proxy got prefill's answer (the prefill instance's own time)"),
    ("proxy_first_chunk", "proxy sent the first token (prefill's, in the opening event)"),
    ("client", "client got the first token"),
)


def timeline_steps(
    marks: list[dict[str, Any]], windows: list[tuple[float, float]],
    decode_side: list[dict[str, float]], selected: list[bool], rows_path: Path | None = None,
    path: tuple[tuple[str, str], ...] = TIMELINE_STEPS,
) -> dict[str, Any]:  # fmt: skip
    """Per step of ``path``, the p50 in ms since the previous one, over the selected
    requests whose marks all fell inside their own window (one request at a time: a
    window's marks are its request's)."""
    rows: list[list[float]] = []
    raw: list[dict[str, Any]] = []  # each request's marks, for a closer look
    for (sent, first), side, chosen in zip(windows, decode_side, selected, strict=True):
        if not chosen:
            continue
        times: dict[str, float] = {"client_sent": sent}
        for mark in marks:
            if sent <= mark["t"] <= first + 0.001:
                times.setdefault(mark["ev"], mark["t"])
        if "compute_scheduled" in times and side.get("prefill") is not None:
            times["first_token"] = times["compute_scheduled"] + side["prefill"]
        times["client"] = first
        if all(event in times for event, _ in path):
            rows.append([times[event] for event, _ in path])
            raw.append({"times": times, "decode": side})
    if not rows:
        return {}
    if rows_path is not None:
        rows_path.write_text(json.dumps(raw))
    steps: dict[str, Any] = {"requests": len(rows)}
    for i, (event, what) in enumerate(path[1:], start=1):
        steps[f"{event}: {what}"] = round(
            1000 * statistics.median(r[i] - r[i - 1] for r in rows), 2
        )
    steps[f"total ({path[0][0]} -> client)"] = round(
        1000 * statistics.median(r[-1] - r[0] for r in rows), 2
    )
    return steps
