"""serving.json and serving.md: the figures of every run, as tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chart import chart
from .settings import KNOWN_WORKLOADS, SLO_TPOT_MS, SLO_TTFT_MS, Settings, workload_order
from .systems import system_order

# workload -> system -> `vllm bench serve`'s result and ours, or {"error": ...}
Results = dict[str, dict[str, dict[str, Any]]]
ANALYSIS = "## What the numbers show"  # the hand-written part below the tables
CHART = "serving.png"


def load_results(out_dir: Path) -> dict[str, Any]:
    """serving.json of ``out_dir``: {"results", "overhead", "commands"}."""
    data: dict[str, Any] = json.loads((out_dir / "serving.json").read_text())
    return data


def _workloads(results: Results) -> list[str]:
    return sorted(results, key=workload_order)


def _rows(results: Results, workload: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted(results.get(workload, {}).items(), key=lambda item: system_order(item[0]))


def write_report(
    results: Results, overhead: dict[str, Any], commands: list[str], settings: Settings,
    out_dir: Path,
) -> None:  # fmt: skip
    """serving.json, serving.md (keeping its hand-written analysis) and the chart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(
        {"results": results, "overhead": overhead, "commands": commands}, indent=2))  # fmt: skip
    lines = [
        "# Serving benchmark", "", *(f"Command: `{c}`" for c in commands), "",
        f"Model: {settings.model_description}. Two cores. "
        f"Each workload runs about {settings.duration_s:g} s of arrivals (`vllm bench serve`, "
        f"random dataset, ignore_eos). Goodput SLO: TTFT <= {SLO_TTFT_MS} ms and "
        f"TPOT <= {SLO_TPOT_MS} ms.", "",
        *latency_table(results),
        "", "Workloads:", *(f"- {w}: {KNOWN_WORKLOADS[w].description}" for w in _workloads(results)
          if w in KNOWN_WORKLOADS),
        *handoff_lines(results), *load_average_lines(results),
        *overhead_lines(overhead, settings.overhead_prompt_len),
        *cpu_table(results), *itl_table(results), *wait_table(results),
        "", f"![TTFT, inter-token latency and throughput per workload]({CHART})", "",
    ]  # fmt: skip
    report = out_dir / "serving.md"
    # The written analysis below the generated part survives a rerun (to be updated by hand).
    analysis = report.read_text().partition(ANALYSIS)[2] if report.exists() else ""
    if analysis:
        lines += ["", ANALYSIS + analysis.rstrip("\n")]
    report.write_text("\n".join(lines) + "\n")
    chart(results, out_dir / CHART)


def latency_table(results: Results) -> list[str]:
    lines = [
        "| workload | system | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | TPOT p50/p90/p99 ms "
        "| req/s | out tok/s | goodput req/s | TTFT p50 vs colocated | vs vLLM P/D best |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in _workloads(results):
        rows = results[workload]
        base = rows.get("colocated", {})
        stock = [rows.get(s, {}) for s in ("vllm-pd-stock", "vllm-pd-tuned")]
        best = min((r["p50_ttft_ms"] for r in stock if "p50_ttft_ms" in r), default=None)
        for system, r in _rows(results, workload):
            if "error" in r:
                lines.append(f"| {workload} | {system} | failed: {r['error'][:80]!r} |"
                             " | | | | | | |")  # fmt: skip
                continue

            def trio(metric: str, r: dict[str, Any] = r) -> str:
                return "/".join(f"{r[f'p{p}_{metric}_ms']:.0f}" for p in (50, 90, 99))

            vs_base = (f"{r['p50_ttft_ms'] / base['p50_ttft_ms']:.2f}x"
                       if base.get("p50_ttft_ms") else "")  # fmt: skip
            vs_stock = f"{r['p50_ttft_ms'] / best:.2f}x" if best else ""
            lines.append(
                f"| {workload} | {system} | {trio('ttft')} | {trio('itl')} | "
                f"{trio('tpot')} | {r['request_throughput']:.2f} | "
                f"{r['output_throughput']:.0f} | {r.get('request_goodput', 0) or 0:.2f} | "
                f"{vs_base} | {vs_stock} |"
            )
    return lines


def load_average_lines(results: Results) -> list[str]:
    """The machine's 1-minute load average before and after each run that recorded it."""
    shown = [f"{w} {system}: {r['load_average_1m'][0]:g} -> {r['load_average_1m'][1]:g}"
             for w in _workloads(results) for system, r in results[w].items()
             if r.get("load_average_1m")]  # fmt: skip
    if not shown:
        return []
    return ["", "The machine's 1-minute load average before -> after each run (2 cores; "
            "the system's own processes and the load generator count): "
            + "; ".join(shown)]  # fmt: skip


def wait_table(results: Results) -> list[str]:
    """Where the first token's time went, hop by hop: the client's mean TTFT, pd's proxy
    (its TTFT and its prefill leg), and each P/D instance's server and engine (vLLM's
    per-request histograms), all as means over the same requests."""
    nan = float("nan")
    rows = []
    for w in _workloads(results):
        for system, r in results[w].items():
            waits = r.get("instance_wait_mean_ms") or {}
            if "prefill" not in waits:
                continue
            proxy = r.get("proxy_wait_mean_ms") or {}
            cells = [f"{client_mean_ttft_ms(r):.0f}",
                     *(f"{proxy[k]:.0f}" if k in proxy else "-" for k in ("ttft", "prefill_leg")),
                     *(f"{waits.get(role, {}).get(key, nan):.0f}" for role in ("prefill", "decode")
                       for key in ("server_ttft", "queue", "prefill"))]  # fmt: skip
            rows.append(f"| {w} | {system} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Where the first token's time went, P/D systems, mean ms per request, from "
            "the outside in: the client's TTFT; pd's proxy, from receiving the request to "
            "sending the first token, and its prefill leg (HTTP both ways included); each "
            "instance's server, from receiving the request to its first token leaving the "
            "engine (vLLM's `time_to_first_token`: HTTP and tokenizing excluded), and of "
            "that the engine's queue (decode's includes the KV load) and its time from "
            "scheduling to the first token (`request_prefill_time`). With pd's first-token "
            "flow, decode's first token is the client's second. A mixed workload's numbers "
            "cover both streams, the client's too:", "",
            "| workload | system | client TTFT | proxy TTFT | proxy: prefill leg "
            "| prefill server TTFT | prefill: queued | prefill: computing "
            "| decode server TTFT | decode: queued | decode: computing |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows]  # fmt: skip


def client_mean_ttft_ms(r: dict[str, Any]) -> float:
    """The client's mean TTFT over both streams of a mixed workload (runs before
    2026-12-06 recorded only the main stream's: then that)."""
    background = r.get("background") or {}
    done, mean = r.get("completed") or 0, r.get("mean_ttft_ms", float("nan"))
    if background.get("completed") and background.get("mean_ttft_ms") is not None:
        other = background["completed"]
        return (done * mean + other * background["mean_ttft_ms"]) / (done + other)
    return float(mean)


def handoff_lines(results: Results) -> list[str]:
    shares = [f"{w} {system}: {r['first_token_handoffs']}"
              for w in _workloads(results) for system, r in results[w].items()
              if r.get("first_token_handoffs") is not None and "first-token" in system]  # fmt: skip
    if not shares:
        return []
    return ["", "Requests whose first token came from the prefill leg, of all answered "
            "(both streams of a mixed workload; the others went sequentially): "
            + "; ".join(shares)]  # fmt: skip


def overhead_lines(overhead: dict[str, Any], prompt_len: int) -> list[str]:
    if not overhead:
        return []
    nan = float("nan")
    lines = ["", f"P/D overhead, one request at a time ({prompt_len}-token prompts):", ""]
    for system, o in overhead.items():
        lines.append(
            f"- {system}: TTFT p50 {o['pd_ttft_p50_ms']:.1f} ms, the prefill instance's "
            f"own time {o['prefill_own_p50_ms']:.1f} ms: overhead "
            f"{o['overhead_p50_ms']:.1f} ms; second token at "
            f"{o.get('second_token_p50_ms') or nan:.1f} ms; paired (each "
            f"request's TTFT minus its own prefill leg as the proxy timed it) "
            f"{o.get('paired_overhead_p50_ms') or nan:.1f} ms; the proxy's own time "
            f"p50 <= {o.get('proxy_own_p50_ms_at_most', nan):g} ms"
        )
        if o.get("decode_ttft_p50_ms") is not None:
            lines.append(
                f"  - requests through decode (sequential path), as the decode instance "
                f"timed them: its vLLM server got the request -> first token "
                f"{o['decode_ttft_p50_ms']:.1f} ms, of which waiting to be scheduled "
                f"(the KV load included) {o['decode_queue_p50_ms']:.1f} ms"
            )
        if "handed_off_overhead_p50_ms" in o:
            lines.append(
                f"  - first token from the prefill leg for {o['first_token_handoffs']} "
                f"requests: their overhead {o.get('handed_off_overhead_p50_ms', nan):.1f} ms,"
                f" second token at {o.get('handed_off_second_token_p50_ms') or nan:.1f} ms;"
                f" the others (sequential) {o.get('sequential_overhead_p50_ms', nan):.1f} ms;"
                f" paired {o.get('handed_off_paired_overhead_p50_ms') or nan:.1f} and "
                f"{o.get('sequential_paired_overhead_p50_ms') or nan:.1f} ms"
            )
        for key, kind in (("first_token_timeline", "first-token"), ("timeline", "sequential")):
            if timeline := o.get(key):
                lines.append(
                    f"  - where it goes, per process (pd.transfer.timeline marks, p50 of each "
                    f"step over {timeline['requests']} {kind} requests, ms since the previous "
                    "step):"
                )
                lines += [f"    - {step}: {ms:.2f}" for step, ms in timeline.items()
                          if step != "requests"]  # fmt: skip
    return lines


def itl_table(results: Results) -> list[str]:
    """Where the inter-token time goes: the gaps as the decode engine produced them
    against the gaps the client saw, and how long the decode worker waited for a core."""
    lines = ["", "Where the inter-token time goes: ITL as the client saw it, against the gaps "
             "between tokens as the decode instance's engine produced them (vLLM's "
             "`vllm:inter_token_latency_seconds`, every request on that instance, read as "
             "bucket upper bounds), and how long threads were runnable but waited for a core "
             "(ms per second of run, from /proc schedstat).", "",
             "| workload | system | client ITL p50/p90/p99 ms | engine ITL p50/p90/p99 ms "
             "(at most) | decode worker waited | vLLM's other processes waited | "
             "everything else waited |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for workload in _workloads(results):
        for system, r in _rows(results, workload):
            if "engine_itl_ms_at_most" not in r:
                continue
            decode_worker = f"vLLM worker [cores {'0-1' if system == 'colocated' else '1'}]"
            waits = r.get("run_queue_wait", {})
            worker = waits.get(decode_worker, 0.0)
            vllm = sum(v for g, v in waits.items() if g.startswith("vLLM ")) - worker
            rest = sum(v for g, v in waits.items() if not g.startswith("vLLM "))
            client = "/".join(f"{r[f'p{q}_itl_ms']:.0f}" for q in (50, 90, 99))
            engine = "/".join(f"{v:g}" for v in r["engine_itl_ms_at_most"].values())
            waited = " | ".join(f"{1000 * v:.0f}" for v in (worker, vllm, rest))
            lines.append(f"| {workload} | {system} | {client} | {engine} | {waited} |")
    return lines if len(lines) > 5 else []


CPU_COLUMNS: dict[str, Callable[[str], bool]] = {
    "model workers": lambda g: g.startswith("vLLM worker"),
    "vLLM engine cores, API servers": lambda g: g.startswith("vLLM "),
    "Ray, pd's actors": lambda g: g.startswith(("Ray", "pd instance")),
    "proxy": lambda g: g.startswith(("pd-serve", "harness")),
    "load generator": lambda g: g.startswith("load generator"),
    "other": lambda g: True,
}


def cpu_table(results: Results) -> list[str]:
    """Cores busy per kind of process while each workload ran (2.0 = both cores)."""
    lines = ["", "Where the CPU went: cores busy per kind of process during each run, "
             "out of 2 (scripts/cpu_meter.py; the proxy of stock vLLM P/D runs in the "
             "harness process).", "",
             "| workload | system | " + " | ".join(CPU_COLUMNS) + " | idle |",
             "| --- | --- |" + " ---: |" * (len(CPU_COLUMNS) + 1)]  # fmt: skip
    for workload in _workloads(results):
        for system, r in _rows(results, workload):
            if "cpu_cores" not in r:
                continue
            sums = dict.fromkeys(CPU_COLUMNS, 0.0)
            for group, cores in r["cpu_cores"].items():
                column = next(c for c, match in CPU_COLUMNS.items() if match(group))
                sums[column] += cores
            idle = max(0.0, 2.0 - sum(sums.values()))
            cells = " | ".join(f"{v:.2f}" for v in [*sums.values(), idle])
            lines.append(f"| {workload} | {system} | {cells} |")
    return lines if len(lines) > 5 else []
