"""Every script the README tells users to run, run the way a user would, in smoke mode.

Each runs in its own process (`python scripts/X.py --smoke ...`) so that an API the
script uses and that was renamed breaks this test, not a user. A script's smoke mode
uses tiny sizes and writes its results under the test's temporary directory, never
over bench/results/.

To cover another script, add one ``ScriptSmoke`` to ``SMOKES``: its arguments (``{out}``
stands for the temporary directory), whether it starts engines, and a check of what it
produced.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pd.transfer.transport.nixl import nixl_available

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScriptSmoke:
    script: str  # under scripts/
    args: tuple[str, ...]
    # Called with the finished run and the temporary directory; asserts what it produced.
    check: Callable[[subprocess.CompletedProcess[str], Path], None]
    engines: bool = False  # starts vLLM engines, Ray or pd-serve
    timeout_s: float = 300
    expected_returncode: Callable[[], int] = lambda: 0


def table_rows(markdown: str) -> dict[str, list[str]]:
    """A markdown table's body rows, by first cell."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("path", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def check_bench_transfer(run: subprocess.CompletedProcess[str], out: Path) -> None:
    report = (out / "transfer.md").read_text()
    assert "Command: `.venv/bin/python scripts/bench_transfer.py --smoke" in report
    rows = table_rows(report)
    transports = ["zmq", "nixl"] if nixl_available() else ["zmq"]
    expected = ["memcpy (one process)", "raw TCP socket (baseline)"] + [
        f"pd {t}, {p} block ids" for t in transports for p in ("contiguous", "scattered")
    ]
    assert list(rows) == expected
    for name, (_ms, gbps, ratio) in rows.items():
        assert float(gbps) > 0 and float(ratio) > 0, (name, gbps, ratio)
    assert rows["raw TCP socket (baseline)"][2] == "1.00"


def check_nixl_idle_cpu(run: subprocess.CompletedProcess[str], out: Path) -> None:
    if not nixl_available():
        assert "NIXL does not import here" in run.stderr
        return
    percents = re.findall(r"^\s+(pd|NIXL default) .*:\s+([\d.]+)%$", run.stdout, re.MULTILINE)
    assert [kind for kind, _ in percents] == ["pd", "NIXL default"], run.stdout
    assert all(float(p) >= 0 for _, p in percents)


def check_pd_pair(run: subprocess.CompletedProcess[str], out: Path) -> None:
    # The script itself exits 1 unless decode loaded the prompt's KV from prefill.
    assert "prefill returned kv_transfer_params:" in run.stdout
    assert "decode answered:" in run.stdout
    counters = re.search(r"decode connector counters: (.*)", run.stdout)
    assert counters and "'vllm:pd_kv_transfers_total': 1.0" in counters.group(1), run.stdout


def check_reliability(run: subprocess.CompletedProcess[str], out: Path) -> None:
    text = (out / "reliability.md").read_text()
    assert "| request_deadline |" in text and "| load_4_clients_5s |" in text, text
    assert "FAILED" not in text, text


def check_bench_serving(run: subprocess.CompletedProcess[str], out: Path) -> None:
    data = json.loads((out / "serving.json").read_text())
    (system, row), *others = data["results"]["smoke"].items()
    assert not others and row["completed"] == row["num_prompts"] > 0 and row["failed"] == 0
    assert row["p50_ttft_ms"] > 0 and row["output_throughput"] > 0 and row["cpu_cores"], row
    assert data["overhead"][system]["pd_ttft_p50_ms"] > 0, data["overhead"]
    # The processes on the default flow's path marked each request's steps
    # (pd.transfer.timeline): the first-token flow's, or the sequential flow's.
    overhead = data["overhead"][system]
    key = "first_token_timeline" if "first-token" in system else "timeline"
    assert overhead.get(key, {}).get("requests", 0) > 0, overhead
    # The first token's way through the proxy and the instances, hop by hop
    hops = row["proxy_wait_mean_ms"], row["instance_wait_mean_ms"]["prefill"]
    assert hops[0]["ttft"] >= hops[0]["prefill_leg"] >= hops[1]["server_ttft"] > 0, hops
    assert f"| smoke | {system} |" in (out / "serving.md").read_text()
    assert (out / "serving.png").stat().st_size > 0


def check_bench_reuse(run: subprocess.CompletedProcess[str], out: Path) -> None:
    data = json.loads((out / "reuse.json").read_text())
    store, vllm = data["docqa"]["store"], data["docqa"]["vllm"]
    docs = data["settings"]["num_docs"]
    assert store["cold"]["n"] == vllm["repeated"]["n"] == docs, data["docqa"]
    # Evicted from the engine's cache, the documents came back from the store's host
    # tier; after the restart, from its disk tier; without the store, from nowhere.
    assert store["repeated"]["counters"]["host_hit_tokens"] > 0, store["repeated"]
    assert store["restarted"]["counters"]["disk_hit_tokens"] > 0, store["restarted"]
    assert store["restarted"]["counters"]["store_load_failures"] == 0, store["restarted"]
    assert vllm["repeated"]["counters"].get("external_hits", 0) == 0, vllm["repeated"]
    for system in ("store", "vllm"):
        row = data["trace"][system]
        assert row["completed"] == row["num_prompts"] > 0 and row["p50_ttft_ms"] > 0, row
        assert data["micro"]["step_time"][system]["engine_step_ms"] > 0, data["micro"]
    lookup = data["micro"]["lookup_on_miss"]
    assert lookup["missed"] == lookup["calls"] > 0 and lookup["p50_ms"] > 0, lookup
    disk = data["micro"]["disk_load"]  # every lookup of the A/B hinted all its blocks
    assert disk["readahead_blocks"] >= disk["pairs"] * disk["blocks"] > 0, disk
    assert disk["after_lookup"]["p50_ms"] > 0 and disk["no_lookup"]["p50_ms"] > 0, disk
    report = (out / "reuse.md").read_text()
    assert "Command: `.venv/bin/python scripts/bench_reuse.py --smoke" in report
    assert "| a lookup that misses everywhere, p50 |" in report
    assert (out / "reuse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_bench_routing(run: subprocess.CompletedProcess[str], out: Path) -> None:
    data = json.loads((out / "routing.json").read_text())
    (system, row), *others = data["rows"]["shared-prefix"].items()
    assert system == "kv_aware" and not others, data["rows"]
    assert row["completed"] == row["num_prompts"] > 0 and row["p90_ttft_ms"] > 0, row
    counters = row["counters"]
    # Every request was routed by kv_aware and counted; its tenants' contexts repeat, so
    # the prefill instances' own prefix caches served some of the prompts.
    assert sum(counters["decisions"].values()) == counters["routing_count"] == row["completed"]
    # kv_aware asked every prompt's token ids: each counted in its tokenizing part
    assert counters["tokenize_count"] == counters["routing_count"], counters
    assert 0 <= counters["tokenize_s_sum"] <= counters["routing_s_sum"], counters
    assert counters["routing_cpu_s_sum"] > 0, counters  # the proxy thread's own time
    assert sum(c["hits"] for n, c in counters["instances"].items() if "prefill" in n) > 0
    assert 0 < data["ideal"]["shared-prefix"]["share"] < 1, data["ideal"]
    # Each request's TTFT, and the route kv_aware logged for it (its debug line).
    requests = json.loads((out / "routing.requests.json").read_text())["shared-prefix"]
    assert len(requests["kv_aware"]["ttfts"]) == row["completed"]
    routes = requests["kv_aware"]["routes"]
    assert len(routes) == row["completed"], routes
    assert {r["decision"] for r in routes} <= {"prefill", "decode_only"}
    assert sum(r["decision"] == "prefill" for r in routes) == counters["decisions"]["prefill"]
    report = (out / "routing.md").read_text()
    assert "Command: `.venv/bin/python scripts/bench_routing.py --smoke" in report
    assert "| kv_aware |" in report
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMOKES = [
    ScriptSmoke(
        "bench_transfer.py", ("--smoke", "--out", "{out}/transfer.md"), check_bench_transfer
    ),
    ScriptSmoke(
        "nixl_idle_cpu.py",
        ("--smoke",),
        check_nixl_idle_cpu,
        expected_returncode=lambda: 0 if nixl_available() else 2,
    ),
    ScriptSmoke("pd_pair.py", ("--smoke",), check_pd_pair, engines=True, timeout_s=600),
    ScriptSmoke(
        "reliability.py",
        ("--smoke", "--output", "{out}/reliability.md"),
        check_reliability,
        engines=True,
        timeout_s=800,
    ),
    ScriptSmoke(
        "bench_serving.py",
        ("--smoke", "--out-dir", "{out}"),
        check_bench_serving,
        engines=True,
        timeout_s=600,
    ),
    ScriptSmoke(
        "bench_reuse.py",
        ("--smoke", "--out-dir", "{out}"),
        check_bench_reuse,
        engines=True,
        timeout_s=900,
    ),
    ScriptSmoke(
        "bench_routing.py",
        ("--smoke", "--out-dir", "{out}"),
        check_bench_routing,
        engines=True,
        timeout_s=600,
    ),
]


@pytest.mark.parametrize(
    "smoke",
    [
        pytest.param(s, id=s.script, marks=[pytest.mark.engines] if s.engines else [])
        for s in SMOKES
    ],
)
def test_script_smoke(smoke: ScriptSmoke, tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "scripts" / smoke.script),
        *(a.replace("{out}", str(tmp_path)) for a in smoke.args),
    ]
    run = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=smoke.timeout_s, check=False
    )
    output = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == smoke.expected_returncode(), output
    smoke.check(run, tmp_path)


def test_bench_serving_replot(tmp_path: Path) -> None:
    """serving.png is a function of serving.json alone: redrawn from the committed one."""
    shutil.copy(REPO / "bench" / "results" / "serving.json", tmp_path)
    command = [sys.executable, str(REPO / "scripts" / "bench_serving.py"), "--replot",
               "--out-dir", str(tmp_path)]  # fmt: skip
    run = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
