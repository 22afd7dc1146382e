"""routing.json, routing.md and the targets' ratios, all from the results alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .systems import DECISIONS, SYSTEMS

CHART = "routing.png"
REQUESTS = "routing.requests.json"  # each request of each row (scripts/routing_bench/run.py)
ANALYSIS = "## What the numbers show"  # the hand-written part below the tables
NAN = float("nan")
# Not measured in this run: ../shared/DYNAMO_ON_CPU.md's figures (2026-12-01, this kind
# of machine, the conversation trace at 32-token blocks, two aggregated vLLM workers).
DYNAMO: dict[str, Any] = {
    "source": "../shared/DYNAMO_ON_CPU.md, measured 2026-12-01 (not in this run)",
    "ideal": 0.395,  # the whole trace's, at 32-token blocks
    "kv": {"hit_rate": (0.363, 0.371), "p50_ttft_ms": (42.4, 45.5),
           "p90_ttft_ms": (96.8, 113.5), "p99_ttft_ms": (216.7, 302.1), "routing_ms": 0.23},
    "round-robin": {"hit_rate": (0.283, 0.290), "p50_ttft_ms": (49.9, 51.4),
                    "p90_ttft_ms": (116.1, 116.6), "p99_ttft_ms": (297.9, 301.5)},
}  # fmt: skip
# (key, what, bound, the direction that meets it)
TARGETS = (
    ("conversation_hit_vs_ideal", "kv_aware's hit rate / the ideal, conversation", 0.97, ">="),
    ("conversation_hit", "kv_aware's hit rate, conversation (Dynamo: 37%)", 0.37, ">="),
    ("shared_prefix_p90_vs_least_loaded",
     "kv_aware's TTFT p90 / least_loaded's, shared-prefix", 0.5, "<="),
    ("routing_ms", "kv_aware's routing time per request, ms (Dynamo: 0.23)", 0.23, "<="),
    ("routing_ms_untokenized", "the same without tokenizing, ms (what Dynamo's 0.23 "
     "counts: its frontend tokenizes before its router)", 0.23, "<="),
)  # fmt: skip


def hit_rate(row: dict[str, Any]) -> dict[str, float]:
    """Prompt tokens no instance had to compute, over the prompt tokens sent.

    A prefill instance computes what its prefix cache lacks (queries - hits). Decode
    computes what it neither held (hits) nor loaded from a prefill instance (external
    hits); what it loaded was computed by prefill and is never counted as reused."""
    instances = row["counters"]["instances"]
    prefill = [c for n, c in instances.items() if "prefill" in n]
    decode = [c for n, c in instances.items() if "decode" in n]
    prompt_tokens = float(row.get("total_input_tokens", 0))
    computed_prefill = sum(c["queries"] - c["hits"] for c in prefill)
    computed_decode = sum(c["queries"] - c["hits"] - c["external_hits"] for c in decode)
    computed = computed_prefill + computed_decode
    return {
        "prompt_tokens": prompt_tokens,
        "computed_on_prefill": computed_prefill,
        "computed_on_decode": computed_decode,
        "share": 1 - computed / prompt_tokens if prompt_tokens else NAN,
        # vLLM's own ratio on the prefill instances alone, for reference
        "prefill_hits_over_queries": sum(c["hits"] for c in prefill)
        / max(1.0, sum(c["queries"] for c in prefill)),
    }


def routing_ms(row: dict[str, Any]) -> float:
    c = row["counters"]
    return 1000 * c["routing_s_sum"] / c["routing_count"] if c["routing_count"] else NAN


def tokenize_ms(row: dict[str, Any]) -> float:
    """Of ``routing_ms``, tokenizing, per routed request (rows from before it was
    measured: nan)."""
    return _per_routed_ms(row, "tokenize_s_sum")


def routing_cpu_ms(row: dict[str, Any]) -> float:
    """Of ``routing_ms``, the proxy thread's CPU time, per routed request."""
    return _per_routed_ms(row, "routing_cpu_s_sum")


def _per_routed_ms(row: dict[str, Any], key: str) -> float:
    c = row["counters"]
    if key not in c or not c["routing_count"]:
        return NAN
    return 1000 * c[key] / c["routing_count"]


def _get(data: Any, *path: str) -> float:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return NAN
        data = data[key]
    return float(data) if isinstance(data, int | float) else NAN


def ratios(results: dict[str, Any]) -> dict[str, float]:
    rows = results.get("rows", {})
    conv = rows.get("conversation", {}).get("kv_aware", {})
    shared = rows.get("shared-prefix", {})
    ideal = _get(results, "ideal", "conversation", "share")
    hit = hit_rate(conv)["share"] if "counters" in conv else NAN
    routing = routing_ms(conv) if "counters" in conv else NAN
    tokenizing = tokenize_ms(conv) if "counters" in conv else NAN
    return {
        "conversation_hit_vs_ideal": hit / ideal,
        "conversation_hit": hit,
        "shared_prefix_p90_vs_least_loaded": _get(shared, "kv_aware", "p90_ttft_ms")
        / _get(shared, "least_loaded", "p90_ttft_ms"),
        "routing_ms": routing,
        "routing_ms_untokenized": routing - tokenizing,
    }


def _met(value: float, bound: float, direction: str) -> str:
    if math.isnan(value):
        return "not measured"
    return "met" if (value >= bound if direction == ">=" else value <= bound) else "missed"


def table(results: dict[str, Any], workload: str) -> list[str]:
    ideal = _get(results, "ideal", workload, "share")
    lines = [
        "| system | hit rate | / ideal | vLLM hits/queries on prefill | TTFT p50 / p90 / p99 ms "
        "| req/s | output tok/s | decisions prefill / decode_only / no_prefill "
        "| routing ms/request (of it tokenizing; CPU) | done |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = results.get("rows", {}).get(workload, {})
    for system in [s for s in SYSTEMS if s in rows]:
        row = rows[system]
        if "error" in row:
            lines.append(f"| {system} | failed: {row['error'][:120]!r} |" + " |" * 8)
            continue
        hit = hit_rate(row)
        d = row["counters"]["decisions"]
        lines.append(
            f"| {system} | {100 * hit['share']:.1f}% | {hit['share'] / ideal:.2f}x "
            f"| {100 * hit['prefill_hits_over_queries']:.1f}% "
            f"| {row['p50_ttft_ms']:.0f} / {row['p90_ttft_ms']:.0f} / {row['p99_ttft_ms']:.0f}"
            f"{_spread(row)} "
            f"| {row['request_throughput']:.2f} | {row['output_throughput']:.0f} "
            f"| {' / '.join(f'{d.get(k, 0):.0f}' for k in DECISIONS)} "
            f"| {routing_ms(row):.3f}{_parts(tokenize_ms(row), routing_cpu_ms(row))} "
            f"| {row['completed']}/{row['num_prompts']} |"
        )
    if workload == "conversation":
        for mode, row in (("kv", DYNAMO["kv"]), ("round-robin", DYNAMO["round-robin"])):
            lo, hi = row["hit_rate"]
            ttft = " / ".join(f"{row[f'p{q}_ttft_ms'][0]:.0f}-{row[f'p{q}_ttft_ms'][1]:.0f}"
                              for q in (50, 90, 99))  # fmt: skip
            routing = f"{row['routing_ms']:.2f}" if "routing_ms" in row else "-"
            lines.append(
                f"| Dynamo 1.6.1 `--router-mode {mode}`, 2 aggregated workers (2026-12-01, "
                f"not this run) | {100 * lo:.1f}-{100 * hi:.1f}% "
                f"| {lo / DYNAMO['ideal']:.2f}-{hi / DYNAMO['ideal']:.2f}x | (aggregated) "
                f"| {ttft} | - | - | - "
                f"| {routing} | 342/342 |"
            )
    return lines


def _spread(row: dict[str, Any]) -> str:
    """A pooled row's runs: how many, and the range of their own p90s."""
    runs = row.get("runs")
    if not runs:
        return ""
    p90s = [r["p90_ttft_ms"] for r in runs]
    return f" ({len(runs)} runs; their p90 {min(p90s):.0f}-{max(p90s):.0f})"


def _parts(*ms: float) -> str:
    known = [f"{v:.3f}" for v in ms if not math.isnan(v)]
    return f" ({'; '.join(known)})" if known else ""


def joined(per_request: dict[str, Any]) -> list[dict[str, Any]]:
    """Each request's TTFT (s), prompt length and send time, with kv_aware's route for
    it where the log had one. The routes are in the order the proxy routed them, the
    requests in the order they were sent: matched by prompt length a few places apart."""
    ttfts, lens, starts = (per_request.get(k) or [] for k in ("ttfts", "input_lens",
                                                              "start_times"))  # fmt: skip
    routes = per_request.get("routes") or []
    order = sorted(range(len(ttfts)), key=lambda i: starts[i])
    t0 = min(starts) if starts else 0.0
    used: set[int] = set()
    out = []
    for k, i in enumerate(order):
        route = None
        for j in range(max(0, k - 8), min(len(routes), k + 9)):
            if j not in used and routes[j]["prompt_tokens"] == lens[i]:
                used.add(j)
                route = routes[j]
                break
        out.append({"ttft_s": ttfts[i], "prompt_tokens": lens[i], "sent_s": starts[i] - t0,
                    "route": route})  # fmt: skip
    return out


def slowest(per_request: dict[str, Any], k: int = 6) -> list[str]:
    """The k slowest requests of a row by TTFT, as a table."""
    rows = sorted(joined(per_request), key=lambda r: -r["ttft_s"])[:k]
    lines = [
        "| TTFT s | sent at s | prompt tokens | route | decode holds | prefill | it holds "
        "| queued there |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        route = r["route"] or {}
        lines.append(
            f"| {r['ttft_s']:.2f} | {r['sent_s']:.1f} | {r['prompt_tokens']} "
            f"| {route.get('decision', '?')} | {route.get('decode_holds', '?')} "
            f"| {route.get('prefill') if route.get('decision') == 'prefill' else '-'} "
            f"| {route.get('prefill_holds', '?')} | {route.get('prefill_queued', '?')} |"
        )
    return lines


def slow_legs(
    row: dict[str, Any], over_s: str = "10.0", histogram: str = "prefill_leg_s"
) -> str:  # fmt: skip
    """How many of a row's prefill legs (or routing calls: ``routing_s``) took longer
    than ``over_s`` (the proxy's pd_prefill_seconds, pd_routing_seconds), of how many."""
    buckets = row.get("counters", {}).get(histogram) or {}
    if "+Inf" not in buckets or over_s not in buckets:
        return "-"
    return f"{buckets['+Inf'] - buckets[over_s]:.0f} of {buckets['+Inf']:.0f}"


def markdown(
    results: dict[str, Any], analysis: str = "", requests: dict[str, Any] | None = None
) -> str:
    s = results["settings"]
    ideal = results["ideal"]
    r = ratios(results)
    lines = [
        "# KV-aware routing: 2 prefill + 1 decode instances, by routing policy",
        "",
        *[f"Command: `{c}`" for c in results["commands"]],
        "",
        f"pd-serve on configs/local.yaml, the tiny model, {results['block_size']}-token "
        f"blocks, its other settings as shipped (`cpus: auto`: the instances share the "
        f"machine's {results['machine']['cpus']} cores). Each system is started afresh "
        "for each workload "
        "(empty caches) and driven by `vllm bench serve --dataset-name timed_trace` "
        "(PYTHONHASHSEED=0: the same prompts at the same times for every system). "
        "Load average (1 min) before/after each run is in routing.json.",
        "",
        "- **hit rate**: prompt tokens no instance computed, over the prompt tokens sent, "
        "from each instance's vLLM counters: a prefill instance computes "
        "`prefix_cache_queries - prefix_cache_hits`; decode computes what it neither held "
        "(`prefix_cache_hits`) nor loaded from prefill (`external_prefix_cache_hits`). KV "
        "loaded onto decode from prefill is therefore never counted as a hit; decode's "
        "own hits count only where it held the blocks itself.",
        "- **ideal**: one unbounded cache shared by all instances, on the same trace, "
        f"counted the same way at {results['block_size']}-token blocks.",
        "- **routing ms**: `pd_routing_seconds` sum / count on the proxy (tokenizing and "
        "hashing the prompt included); in brackets its tokenizing part "
        "(`pd_routing_tokenize_seconds`), which Dynamo's router time does not count (its "
        "frontend tokenizes every request before routing), and the proxy thread's CPU time "
        "in it (`pd_routing_cpu_seconds`; the rest is waiting for a core).",
        "",
        f"## Conversation trace ({s['trace_prompts']} requests of "
        "../shared/traces/conversation-k40-b16.jsonl, arrivals over "
        f"{300 * s['trace_sec_multiplier'] / 0.001:.0f} s; 1 GiB of KV cache per instance)",
        "",
        f"Ideal: {100 * ideal['conversation']['share']:.1f}% of "
        f"{ideal['conversation']['prompt_tokens']:.0f} prompt tokens.",
        "",
        *table(results, "conversation"),
        "",
        f"## Shared-prefix workload ({s['tenants']} tenants, each a {s['context_tokens']}-"
        f"token context; {s['questions']} questions of {s['question_tokens']} tokens to a "
        f"random tenant, Poisson at {s['question_rate']:g}/s, {s['answer_tokens']} tokens "
        f"each; {s['shared_prefix_engine_blocks']} blocks of KV cache per instance, "
        f"{s['shared_prefix_engine_blocks'] * results['block_size'] // s['context_tokens']} "
        "contexts' worth: fewer than all, more than half)",
        "",
        f"Ideal: {100 * ideal['shared-prefix']['share']:.1f}% of "
        f"{ideal['shared-prefix']['prompt_tokens']:.0f} prompt tokens.",
        "",
        *table(results, "shared-prefix"),
        "",
        *slow_requests(results, requests or {}),
        "## Targets",
        "",
        "| target | bound | measured | |",
        "| --- | --- | --- | --- |",
        *[
            f"| {what} | {direction} {bound:g} | {r[key]:.3f} | {_met(r[key], bound, direction)} |"
            for key, what, bound, direction in TARGETS
        ],
        "",
        f"![routing]({CHART})",
        "",
    ]
    return "\n".join(lines) + ("\n" + analysis if analysis else "")


def slow_requests(results: dict[str, Any], requests: dict[str, Any]) -> list[str]:
    """kv_aware's slowest requests per workload, and the slow prefill legs per row."""
    lines = []
    for workload, rows in requests.items():
        if "kv_aware" not in rows:
            continue
        kv_row = results.get("rows", {}).get(workload, {}).get("kv_aware", {})
        legs = ", ".join(f"{system} {slow_legs(row)}"
                         for system, row in results.get("rows", {}).get(workload, {}).items()
                         if "error" not in row)  # fmt: skip
        lines += [
            f"### {workload}: kv_aware's slowest requests (routing.requests.json)",
            "",
            "Each with the route the proxy logged for it: what decode and the best prefill "
            "instance held of its prompt then, and the prompt tokens queued there. Prefill "
            f"legs over 10 s (`pd_prefill_seconds`): {legs}. kv_aware's routing calls "
            f"over 1 ms (`pd_routing_seconds`): {slow_legs(kv_row, '0.001', 'routing_s')}.",
            "",
            *slowest(rows["kv_aware"]),
            "",
        ]
    return lines


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    from .chart import chart

    out_dir.mkdir(parents=True, exist_ok=True)
    results["ratios"] = ratios(results)
    (out_dir / "routing.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_markdown(results, out_dir)
    chart(results, out_dir / CHART)


def write_markdown(results: dict[str, Any], out_dir: Path) -> None:
    """routing.md from the results, keeping its hand-written analysis if it has one."""
    md = out_dir / "routing.md"
    analysis = ""
    if md.exists() and ANALYSIS in md.read_text():
        analysis = md.read_text()[md.read_text().index(ANALYSIS) :]
    requests_file = out_dir / REQUESTS
    requests = json.loads(requests_file.read_text()) if requests_file.exists() else {}
    md.write_text(markdown(results, analysis, requests))
