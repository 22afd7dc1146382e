"""Each system in turn: start it, run the workloads and (pd) the overhead probe on it,
tear it down completely; then the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any

from pd.models import make_model

from .load import measure
from .overhead import pd_overhead
from .report import Results, write_report
from .settings import Settings
from .systems import PdServe, make_system


def run(
    systems: list[str], workloads: list[str], settings: Settings, out_dir: Path,
    command: str, merge: bool = False,
) -> tuple[Results, list[str]]:  # fmt: skip
    """Benchmark ``systems`` on the named ``workloads`` and write the report to
    ``out_dir``; with ``merge``, keep the rows of its serving.json this run does not redo.
    Returns the results and the systems that failed to start or to be probed (a workload
    that overloads a system is a result, not a failure)."""
    if shutil.which("pgrep") and subprocess.run(["pgrep", "-f", "vllm serve"]).returncode == 0:
        print("warning: another `vllm serve` is running; results will be disturbed")
    model = make_model(settings.model_preset)
    results: Results = {}
    overhead: dict[str, Any] = {}
    commands: list[str] = []
    if merge and (out_dir / "serving.json").exists():
        earlier = json.loads((out_dir / "serving.json").read_text())
        for workload, rows in earlier["results"].items():
            for system, row in rows.items():
                if system not in systems or workload not in workloads:
                    results.setdefault(workload, {})[system] = row
        overhead = {k: v for k, v in earlier["overhead"].items() if k not in systems}
        commands = earlier.get("commands", [])
    commands.append(command)
    failed: list[str] = []
    for name in systems:
        system = make_system(name, settings)
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        print(f"== {name} (logs in {workdir})", flush=True)
        try:
            url = system.start(model, workdir)
            for index, workload in enumerate(settings.workloads):
                if workload.name not in workloads:
                    continue
                seed = 100 + index  # the same prompts for every system
                result = measure(system, url, model, settings, workload, workdir, seed)
                results.setdefault(workload.name, {})[name] = result
                shown = result.get("error") or (
                    f"TTFT p50 {result['p50_ttft_ms']:.0f} ms, "
                    f"ITL p99 {result['p99_itl_ms']:.0f} ms"
                )
                print(f"   {workload.name}: {shown}", flush=True)
            if isinstance(system, PdServe):
                overhead[name] = pd_overhead(system, url)
                print(f"   overhead: {overhead[name]}", flush=True)
        except Exception as e:
            print(f"   {name} failed: {e!r}", flush=True)
            failed.append(name)
            traceback.print_exc()
            for workload in settings.workloads:
                if workload.name in workloads:
                    results.setdefault(workload.name, {}).setdefault(name, {"error": str(e)[:300]})
        finally:
            system.stop()
    write_report(results, overhead, commands, settings, out_dir)
    print(f"wrote {out_dir / 'serving.md'}")
    return results, failed
