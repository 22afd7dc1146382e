"""reuse.json, reuse.md and the targets' ratios, all from the results alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .chart import chart
from .scrape import histogram_mean_ms, histogram_quantile_ms

ANALYSIS = "## What the numbers show"  # the hand-written part below the tables
CHART = "reuse.png"
NAN = float("nan")

# (key, what, short name for the chart, bound, unit of the figure)
TARGETS = (
    ("docqa_repeated_vs_cold", "repeated documents' TTFT p50 against cold, with the store",
     "docs repeated / cold", 0.2, "x"),
    ("docqa_restarted_vs_cold", "after a restart (disk tier), TTFT p50 against cold",
     "docs after restart / cold", 0.3, "x"),
    ("trace_ttft_p50_store_vs_vllm", "trace TTFT p50, store on against off",
     "trace TTFT p50 on / off", 0.7, "x"),
    ("lookup_miss_p50_ms", "a lookup that misses everywhere, p50", "lookup on a miss, p50",
     1.0, "ms"),
    ("save_step_time_overhead", "engine step time, store on (saving) against off, minus 1",
     "step time on / off", 0.05, "%"),
)  # fmt: skip


def _get(data: dict[str, Any], *path: str) -> float:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return NAN
        data = data[key]
    return float(data) if isinstance(data, int | float) else NAN


def ratios(results: dict[str, Any]) -> dict[str, float]:
    docqa, micro = results.get("docqa", {}), results.get("micro", {})
    cold = _get(docqa, "store", "cold", "p50_ms")
    step = micro.get("step_time", {})
    return {
        "docqa_repeated_vs_cold": _get(docqa, "store", "repeated", "p50_ms") / cold,
        "docqa_restarted_vs_cold": _get(docqa, "store", "restarted", "p50_ms") / cold,
        "docqa_vllm_repeated_vs_cold": _get(docqa, "vllm", "repeated", "p50_ms")
        / _get(docqa, "vllm", "cold", "p50_ms"),
        "docqa_store_cold_vs_vllm_cold": cold / _get(docqa, "vllm", "cold", "p50_ms"),
        "trace_ttft_p50_store_vs_vllm": _get(results, "trace", "store", "p50_ttft_ms")
        / _get(results, "trace", "vllm", "p50_ttft_ms"),
        "lookup_miss_p50_ms": _get(micro, "lookup_on_miss", "p50_ms"),
        "save_step_time_overhead": _get(step, "store", "engine_step_ms")
        / _get(step, "vllm", "engine_step_ms")
        - 1,
        "save_wall_time_overhead": _get(step, "store", "wall_s") / _get(step, "vllm", "wall_s") - 1,
    }


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    return {"x": f"{value:.2f}x", "ms": f"{value:.3f} ms", "%": f"{100 * value:+.1f}%"}[unit]


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["ratios"] = ratios(results)
    (out_dir / "reuse.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out_dir)
    chart(results, out_dir / CHART)


def write_markdown(results: dict[str, Any], out_dir: Path) -> None:
    s, machine = results["settings"], results["machine"]
    loads = [p["loadavg_1m"] for p in results.get("phases", [])]
    load_range = (f"{min(min(x) for x in loads):.1f}-{max(max(x) for x in loads):.1f}"
                  if loads else "n/a")  # fmt: skip
    lines = [
        "# KV reuse benchmark", "",
        f"Command: `{results['command']}`", "",
        *[f"Rerun {r['started']}, parts {', '.join(r['parts'])} replaced (1-minute load "
          f"average {r['machine']['loadavg_at_start'][0]:.1f} at its start, "
          f"{r['machine']['other_vllm_servers_at_start']} other `vllm serve` running): "
          f"`{r['command']}`" for r in results.get("reruns", [])],
        *([""] if results.get("reruns") else []),
        f"Run {results['started']} on pd's `{s['model_preset']}` model (float32, 128-token "
        f"blocks) on {machine['cpus']} cores shared with other work: 1-minute load average "
        f"{load_range} during the phases ({machine['other_vllm_servers_at_start']} other "
        "`vllm serve` running at the start). Both systems are one plain `vllm serve` on "
        f"both cores with the same engine KV cache, `--num-gpu-blocks-override "
        f"{s['engine_blocks']}` ({s['engine_blocks'] * 128:,} tokens): **store** is pd's "
        f"connector with the node's KV store (host tier {s['host_gib']:g} GiB, disk tier "
        f"{s['disk_gib']:g} GiB), **vllm** has no connector (vLLM's prefix cache alone).", "",
        *target_table(results), "",
        *docqa_table(results), "",
        *trace_table(results), "",
        *micro_lines(results), "",
        *phase_table(results), "",
        f"![TTFT per phase and system, and each target's ratio]({CHART})", "",
    ]  # fmt: skip
    if results.get("errors"):
        lines += ["Errors:", *(f"- {e}" for e in results["errors"]), ""]
    report = out_dir / "reuse.md"
    # The written analysis below the generated part survives a rerun (update it by hand).
    analysis = report.read_text().partition(ANALYSIS)[2] if report.exists() else ""
    if analysis:
        lines += [ANALYSIS + analysis.rstrip("\n")]
    report.write_text("\n".join(lines).rstrip("\n") + "\n")


def target_table(results: dict[str, Any]) -> list[str]:
    r = results["ratios"]
    lines = ["| target | measured | bound | met |", "| --- | ---: | ---: | --- |"]
    for key, what, _short, bound, unit in TARGETS:
        value = r.get(key, NAN)
        met = "n/a" if math.isnan(value) else ("yes" if value <= bound else "**no**")
        lines.append(f"| {what} | {_fmt(value, unit)} | {_fmt(bound, unit)} | {met} |")
    return lines


def docqa_table(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    lines = [
        f"Long-document QA: {s['num_docs']} documents of {s['doc_tokens']} tokens "
        f"({s['num_docs'] * s['doc_tokens'] / (s['engine_blocks'] * 128):.1f}x the engine's "
        f"cache), a {s['question_tokens']}-token question each, {s['answer_tokens']} tokens "
        f"answered, one request at a time, documents in order: a cold pass, "
        f"{s['repeat_rounds']} repeated passes (new questions), and for the store system "
        "one pass after the instance and the store process were restarted (the disk "
        "tier's files dropped from the page cache first, so they are read from disk). "
        "TTFT is the client's (request sent to first streamed chunk). Tokens served per "
        "pass, from vLLM's counters and the store process's: the engine's prefix cache, "
        "the store's host tier, its disk tier.", "",
        "| system | pass | requests | TTFT p50 ms | p90 ms | mean ms | p50 vs cold | "
        "engine cache tokens | host tier tokens | disk tier tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for system, passes in results.get("docqa", {}).items():
        cold = _get(passes, "cold", "p50_ms")
        for name, row in passes.items():
            if "error" in row:
                lines.append(f"| {system} | {name} | failed: {row['error'][:100]!r} |"
                             + " |" * 7)  # fmt: skip
                continue
            c = row.get("counters", {})
            lines.append(
                f"| {system} | {name} | {row['n']} | {row['p50_ms']:.0f} | {row['p90_ms']:.0f} "
                f"| {row['mean_ms']:.0f} | {row['p50_ms'] / cold:.2f}x "
                f"| {c.get('prefix_cache_hits', 0):.0f} | {c.get('host_hit_tokens', 0):.0f} "
                f"| {c.get('disk_hit_tokens', 0):.0f} |"
            )
    timing = [
        f"{name} lookup {histogram_mean_ms(c, 'lookup'):.2f} ms, load "
        f"{histogram_mean_ms(c, 'load'):.0f} ms, save {histogram_mean_ms(c, 'save'):.0f} ms"
        for name, row in results.get("docqa", {}).get("store", {}).items()
        if (c := row.get("counters", {})).get("vllm:pd_kv_store_lookup_seconds_count")
    ]
    if timing:
        lines += ["", "The store system's connector, mean per request that did each (its "
                  "`vllm:pd_kv_store_{lookup,load,save}_seconds`; a load reads the "
                  "blocks from the store and writes them into the engine's cache, a save "
                  "copies them out and puts them, off the engine step): "
                  + "; ".join(timing) + "."]  # fmt: skip
    return lines


def trace_table(results: dict[str, Any]) -> list[str]:
    s, t = results["settings"], results.get("trace", {})
    ideal = t.get("ideal", {})
    lines = [
        f"The trace: ../shared/traces/conversation-k40-b16.jsonl, {s['trace_prompts']} "
        f"requests replayed by `vllm bench serve --dataset-name timed_trace` "
        f"(`--timed-trace-sec-multiplier {s['trace_sec_multiplier']:g}`, PYTHONHASHSEED=0: "
        "the same prompts at the same times for both). Reuse as a share of all prompt "
        "tokens; ideal: what an unbounded cache of 128-token blocks could serve "
        f"({100 * ideal.get('share', NAN):.1f}%, {ideal.get('reusable_tokens', 0):,} of "
        f"{ideal.get('prompt_tokens', 0):,} tokens, never a prompt's last token).", "",
        "| system | completed | TTFT p50/p90/p99 ms | TPOT p50 ms | req/s | out tok/s | "
        "engine cache | store host | store disk | all reuse | of ideal |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for system in ("store", "vllm"):
        row = t.get(system)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {system} | failed: {row['error'][-100:]!r} |" + " |" * 9)
            continue
        c = row.get("counters", {})
        total = c.get("prompt_tokens") or row.get("total_input_tokens") or NAN
        engine = c.get("prefix_cache_hits", 0) / total
        host, disk = c.get("host_hit_tokens", 0) / total, c.get("disk_hit_tokens", 0) / total
        share = engine + host + disk
        ttft = "/".join(f"{row[f'p{q}_ttft_ms']:.0f}" for q in (50, 90, 99))
        lines.append(
            f"| {system} | {row['completed']} of {row['num_prompts']} | {ttft} "
            f"| {row['p50_tpot_ms']:.1f} | {row['request_throughput']:.2f} "
            f"| {row['output_throughput']:.0f} | {100 * engine:.1f}% | {100 * host:.1f}% "
            f"| {100 * disk:.1f}% | {100 * share:.1f}% | {share / ideal.get('share', NAN):.2f} |"
        )
    return lines


def micro_lines(results: dict[str, Any]) -> list[str]:
    micro = results.get("micro", {})
    s = results["settings"]
    lines = ["Micro figures:", ""]
    lookup = micro.get("lookup_on_miss", {})
    if "p50_ms" in lookup:
        lines.append(
            f"- A lookup that misses everywhere: `StoreClient.lookup` of "
            f"{lookup['blocks_per_call']} unstored block hashes (a {s['max_model_len']}-token "
            f"prompt's full blocks), the call the scheduler makes per new request, against "
            f"the benchmark's own store process while it held {lookup['store_entries']} "
            f"entries, {lookup['calls']} calls one after another: p50 {lookup['p50_ms']:.3f} "
            f"ms, p90 {lookup['p90_ms']:.3f} ms, p99 {lookup['p99_ms']:.3f} ms "
            f"({lookup['missed']} of {lookup['calls']} missed, {lookup['failed_calls']} failed)."
        )
    elif lookup:
        lines.append(f"- Lookup on a miss: failed: {lookup.get('error', '')[:200]}")
    cold = results.get("docqa", {}).get("store", {}).get("cold", {}).get("counters", {})
    if cold.get("vllm:pd_kv_store_lookup_seconds_count"):
        lines.append(
            "- The same as the connector timed it in the scheduler during the documents' "
            f"cold pass (every lookup a miss): mean {histogram_mean_ms(cold, 'lookup'):.3f} "
            f"ms, p50 <= {histogram_quantile_ms(cold, 'lookup', 0.5):g} ms (a bucket "
            "bound), over "
            f"{cold['vllm:pd_kv_store_lookup_seconds_count']:.0f} lookups."
        )
    disk = micro.get("disk_load", {})
    if "after_lookup" in disk:
        after, alone, lookup = disk["after_lookup"], disk["no_lookup"], disk["lookup"]
        lines.append(
            f"- A load from disk, and what the store's readahead buys it: a store process "
            f"of its own (host tier off) holding {disk['blocks']} blocks of "
            f"{disk['block_bytes'] // 1024} KiB, the page cache dropped before each get, "
            f"{disk['pairs']} pairs alternating. The get {1000 * disk['step_s']:.0f} ms (a "
            f"step) after a lookup that hinted its blocks into the page cache: p50 "
            f"{after['p50_ms']:.1f} ms, p90 {after['p90_ms']:.1f} ms; with no lookup before "
            f"it: p50 {alone['p50_ms']:.1f} ms, p90 {alone['p90_ms']:.1f} ms "
            f"(**{after['p50_ms'] / alone['p50_ms']:.2f}x** at p50); the lookups themselves "
            f"p50 {lookup['p50_ms']:.2f} ms."
        )
    elif disk:
        lines.append(f"- Disk load: failed: {disk.get('error', '')[:200]}")
    step = micro.get("step_time", {})
    if step:
        lines += [
            f"- Step time: {s['step_requests']} requests of {s['step_prompt_tokens']} unique "
            f"prompt tokens ({s['step_prompt_tokens'] // 128} full blocks each, all saved by "
            f"the store system) and {s['step_output_tokens']} output tokens, "
            f"{s['step_concurrency']} at a time, {s['step_rounds']} rounds per system"
            + (", both systems started side by side and their rounds alternating (each "
               "round's prompts the same for both; a store round's saves settled, then a "
               "2 s pause, before the next round), so the machine's load falls on both "
               "alike. " if any(r.get("paired") for r in step.values()) else ". ")
            + "The engine's step time is the mean of vLLM's `vllm:inter_token_latency_seconds` "
            "(sum over count: the gaps between a request's tokens as its engine core "
            "produced them, one engine step each), which includes the saver thread's "
            "copies, the store puts and the lookups competing for the same two cores; "
            "the store system also carries pd's connector, so this bounds saving's cost "
            "from above.", "",
            "| system | round | engine step ms | wall s | token gaps | blocks stored "
            "| already stored | saves skipped | saves settled s | load avg |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]  # fmt: skip
        for system, row in step.items():
            if "error" in row:
                lines.append(f"| {system} | failed: {row['error'][:100]!r} |" + " |" * 8)
                continue
            for i, r in enumerate(row["rounds"], 1):
                lines.append(
                    f"| {system} | {i} | {r['engine_step_ms']:.2f} | {r['wall_s']:.1f} "
                    f"| {r['token_gaps']:.0f} | {r['blocks_stored']:.0f} "
                    f"| {r.get('saves_already_stored', NAN):.0f} | {r['saves_skipped']:.0f} "
                    f"| {r.get('save_drain_s', NAN):.1f} | {r['loadavg_1m']:.1f} |"
                )
        wall = results["ratios"].get("save_wall_time_overhead", NAN)
        lines += ["", f"Wall time of the same load, store on against off: {_fmt(wall, '%')}."]
    return lines


def phase_table(results: dict[str, Any]) -> list[str]:
    lines = ["Phases in run order (1-minute load average at start and end):", "",
             "| phase | seconds | load avg |", "| --- | ---: | --- |"]  # fmt: skip
    for p in results.get("phases", []):
        lines.append(f"| {p['phase']}{' (rerun)' if p.get('rerun') else ''} "
                     f"| {p['seconds']:.0f} | "
                     f"{p['loadavg_1m'][0]:.1f} -> {p['loadavg_1m'][1]:.1f} |")  # fmt: skip
    return lines
