"""Faults and load against one real pd-serve; writes docs/reliability.md.

    .venv/bin/python scripts/reliability.py [--duration-s 120] [--clients 64]

Starts pd-serve on configs/local.yaml (with the short deadlines below, and its own
proxy and Ray dashboard ports), runs every fault scenario of tests/reliability.py (the
same ones tests/test_faults.py runs) and then the load scenario: ``--clients``
concurrent streaming clients for ``--duration-s`` seconds over loopback, sampling the
pd-serve process's RSS each second. Every request must complete or end in a clear
error; none may be lost (dropped, malformed, truncated) or hang; after each scenario no
instance may hold KV blocks and the proxy no extra connections. Exit code 0 when
everything held, 1 otherwise; the report is written either way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd.cluster.config import ClusterConfig  # noqa: E402
from tests import reliability as rel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=120, help="load run length")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument(
        "--request-s", type=float, default=30, help="timeouts.request_s (the per-request deadline)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="SCENARIO",
        help="run only these fault scenarios (default: all; 'none': load only)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args()

    overrides = rel.deep_merge(rel.FAULT_OVERRIDES, {"timeouts": {"request_s": args.request_s}})
    scenarios = [s for s in rel.FAULT_SCENARIOS if args.only is None or s.__name__ in args.only]
    memory = rel.MemoryTrace()
    load = rel.load_scenario(args.clients, args.duration_s, memory)

    started = time.monotonic()
    host_load = LoadAverage().start()
    serve = rel.PdServe(rel.derived_config(overrides)).start()
    print(f"reliability: pd-serve starting (log {serve.log_path})", flush=True)
    results: list[rel.ScenarioResult] = []
    rss_start = rss_end = 0.0
    transport = "unknown"
    try:
        serve.wait_ready()
        baseline = asyncio.run(rel.warm_up(serve))
        print(f"reliability: ready; idle proxy connections: {baseline}", flush=True)
        rss_start = serve.rss_mib()
        transport = asyncio.run(_transport(serve))
        for scenario in [*scenarios, load]:
            print(f"reliability: running {scenario.__name__}", flush=True)
            result = asyncio.run(rel.run_scenario(serve, scenario, baseline))
            print(result.summary(), flush=True)
            results.append(result)
        rss_end = serve.rss_mib()
    finally:
        code = serve.terminate()
        print(f"reliability: pd-serve stopped (exit code {code})", flush=True)

    host_load.stop()
    report = render(
        args,
        overrides,
        results,
        memory,
        (rss_start, rss_end),
        transport,
        time.monotonic() - started,
        host_load,
    )
    args.output.write_text(report)
    print(f"reliability: wrote {args.output}")
    return 0 if all(_passed(r) for r in results) else 1


async def _transport(serve: rel.PdServe) -> str:
    """Which transport the decode instance used for the warm-up's KV loads."""
    decode = serve.instances()["pd-decode-0"]
    async with rel.http_client() as http:
        metrics = await decode.metrics(http)
    used = [t for t in ("nixl", "zmq") if metrics.get(f"vllm:pd_kv_transfers_via_{t}_total")]
    return ", ".join(used) or "unknown"


def _passed(result: rel.ScenarioResult) -> bool:
    return not result.failures() and result.stranded == 0


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


def render(args, overrides, results, memory, rss, transport, elapsed_s, host_load) -> str:
    command = ".venv/bin/python scripts/reliability.py " + shlex.join(sys.argv[1:])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "pd"], capture_output=True, text=True
    ).stdout.strip()
    flat = [f"{k}.{k2}: {v2}" for k, v in overrides.items() for k2, v2 in v.items()]
    flow = getattr(
        ClusterConfig.model_validate(rel.derived_config(overrides)).proxy, "flow", "sequential"
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
        "are tests/reliability.py; tests/test_faults.py runs the same ones in the test "
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
        errors = {}
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


if __name__ == "__main__":
    sys.exit(main())
