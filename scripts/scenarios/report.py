"""docs/reliability.md: the scenarios' results as a table, then each scenario's checks."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from pd.cluster.config import ClusterConfig
from pd.serve_process import PdServeProcess, local_config

from .load import MemoryTrace
from .probes import instance_metrics
from .results import ScenarioResult

REPO = Path(__file__).resolve().parents[2]


class LoadAverage:
    """The host's 1-minute load average, sampled every 5 s in the background: other jobs
    on the machine slow the engines down, and the report says how busy it was."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stopped = threading.Event()

    def start(self) -> LoadAverage:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(5):
            self.samples.append(os.getloadavg()[0])

    def describe(self) -> str:
        if not self.samples:
            return "not sampled"
        return (
            f"mean {statistics.mean(self.samples):.1f}, max {max(self.samples):.1f} "
            f"on {os.cpu_count()} cores"
        )


async def transport_used(serve: PdServeProcess, http: httpx.AsyncClient) -> str:
    """Which transport the decode instance used for its KV loads so far."""
    metrics = await instance_metrics(serve.instances()["pd-decode-0"], http)
    used = [t for t in ("nixl", "zmq") if metrics.get(f"vllm:pd_kv_transfers_via_{t}_total")]
    return ", ".join(used) or "unknown"


def passed(result: ScenarioResult) -> bool:
    return not result.failures() and result.stranded == 0


def render(
    args: argparse.Namespace,
    overrides: dict[str, Any],
    results: list[ScenarioResult],
    memory: MemoryTrace,
    rss: tuple[float, float],
    transport: str,
    elapsed_s: float,
    host_load: LoadAverage,
) -> str:
    command = ".venv/bin/python scripts/reliability.py " + shlex.join(sys.argv[1:])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "pd"], capture_output=True, text=True
    ).stdout.strip()
    flat = [f"{k}.{k2}: {v2}" for k, v in overrides.items() for k2, v2 in v.items()]
    flow = getattr(
        ClusterConfig.model_validate(local_config(overrides)).proxy, "flow", "sequential"
    )
    lines = [
        "# Reliability: faults and load",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU "
        f"cores, commit {commit}{' plus uncommitted changes in pd/' if dirty else ''}, "
        f"{elapsed_s / 60:.0f} min in all; host load average (1 min) during the run: "
        f"{host_load.describe()}. pd-serve on configs/local.yaml (1 prefill + 1 "
        f"decode instance of the tiny model, KV transport `auto`, used: {transport}; "
        f"proxy flow `{flow}`) with "
        f"{', '.join(flat)}. Faults are signals on the instances' real vLLM processes: "
        "SIGKILL (a crash), SIGSTOP (stops answering), SIGCONT (recovers). The scenarios "
        "are scripts/scenarios/; tests/test_faults.py runs the same ones in the test "
        "suite.",
        "",
        "Outcomes: **completed**: 200 and the full answer (streams: every event parses, "
        "usage says `max_tokens` tokens, `data: [DONE]` last). **failed with a clear "
        "error**: an error status with an OpenAI error body, or a stream ending in an "
        "OpenAI error event. **lost**: anything else (dropped connection, malformed or "
        "truncated answer). **hung**: no end within the client's deadline. **stranded "
        "blocks**: KV blocks still held on an instance (vLLM's `kv_cache_usage_perc`) "
        "once the scenario is over, after waiting out the lease timeout.",
        "",
        "| scenario | requests sent | completed | failed with a clear error | lost | hung "
        "| stranded blocks | checks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        failed = [what for what, ok, _ in r.checks if not ok]
        checks = "all passed" if not failed else "FAILED: " + "; ".join(failed)
        lines.append(
            f"| {r.name} | {len(r.outcomes)} | {r.count('completed')} | {r.count('error')} "
            f"| {r.count('lost')} | {r.count('hung')} | {r.stranded} | {checks} |"
        )
    if memory.samples:
        first, last = memory.quarter_means()
        lines += [
            "",
            "## Proxy memory (pd-serve process RSS, sampled each second of the load run)",
            "",
            f"- first quarter mean {first:.1f} MiB, last quarter mean {last:.1f} MiB "
            f"({100 * (last - first) / first:+.1f}%), peak {memory.peak():.1f} MiB, "
            f"{len(memory.samples)} samples",
            f"- before the first scenario {rss[0]:.1f} MiB, after the last {rss[1]:.1f} MiB",
        ]
    lines += ["", "## Scenarios", ""]
    for r in results:
        lines += [
            f"### {r.name}",
            "",
            r.description,
            "",
            f"Took {r.elapsed_s:.0f} s. Proxy connections (baseline, after): {r.connections}.",
            "",
        ]
        for what, ok, detail in r.checks:
            lines.append(
                f"- {'ok' if ok else '**FAILED**'}: {what}"
                + (f" ({detail[:300]})" if detail else "")
            )
        for note in r.notes:
            lines.append(f"- note: {note}")
        bad = [o for o in r.outcomes if o.kind in ("lost", "hung")]
        for o in bad[:10]:
            lines.append(f"- {o.kind} request ({o.elapsed_s:.1f} s): `{o.detail[:200]}`")
        errors: dict[int | None, int] = {}
        for o in r.outcomes:
            if o.kind == "error":
                errors[o.status] = errors.get(o.status, 0) + 1
        if errors:
            lines.append(
                "- clear errors by HTTP status (200: an error event in a stream): "
                + ", ".join(f"{s}: {n}" for s, n in sorted(errors.items()))
            )
        lines.append("")
    return "\n".join(lines)
