"""The load driver: vLLM's own client (``vllm bench serve``, random dataset) against a
system, with the machine's CPU time and the decode engine's token gaps around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cpu_meter import CpuMeter

from . import scrape
from .settings import SLO_TPOT_MS, SLO_TTFT_MS, Load, Settings, Workload
from .systems import System


def bench_serve(
    url: str, model: Path, served: str, load: Load, duration_s: float, out: Path, seed: int
) -> subprocess.Popen[bytes]:
    num_prompts = max(4, int(load.rate * duration_s))
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", served, "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(load.input_len),
        "--random-output-len", str(load.output_len), "--ignore-eos",
        "--request-rate", str(load.rate), "--num-prompts", str(num_prompts), "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--goodput", f"ttft:{SLO_TTFT_MS}", f"tpot:{SLO_TPOT_MS}",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_workload(
    url: str, model: Path, settings: Settings, workload: Workload, workdir: Path, seed: int
) -> dict[str, Any]:
    """``vllm bench serve``'s result for the workload's main stream, or {"error": why}.
    ``seed`` differs per workload: no run may hit prefixes an earlier run cached."""
    duration_s = settings.duration_s
    main_out = workdir / f"{workload.name}.json"
    procs = [bench_serve(url, model, settings.served_name, workload.main, duration_s, main_out,
                         seed=seed)]  # fmt: skip
    if workload.background:
        procs.append(
            bench_serve(url, model, settings.served_name, workload.background, duration_s,
                        workdir / f"{workload.name}-bg.json", seed=seed + 1000)
        )  # fmt: skip
    limit_s = duration_s * 3 + 45  # past this the system is overloaded: say so, move on
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            return {"error": f"did not finish in {limit_s:.0f}s (overloaded)"}
        if proc.returncode != 0:
            for p in procs:
                p.kill()
                p.wait()
            return {"error": output.decode(errors="replace")[-1500:]}
    result: dict[str, Any] = json.loads(main_out.read_text())
    if workload.background:  # the instances' and proxy's means cover both streams
        background = json.loads((workdir / f"{workload.name}-bg.json").read_text())
        result["background"] = {k: background.get(k) for k in ("completed", "mean_ttft_ms")}
    return result


def measure(
    system: System, url: str, model: Path, settings: Settings, workload: Workload,
    workdir: Path, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """One workload on a started system: the client's figures, the cores each kind of
    process used, how long they waited for one, the decode engine's own token gaps and
    (pd) how many first tokens came from the prefill leg."""
    handoffs = scrape.first_token_handoffs(url) if system.is_pd else None
    itl_before = scrape.engine_itl_buckets(system.decode_url)
    load_before = os.getloadavg()[0]
    instances = {"decode": system.decode_url, "prefill": system.prefill_url}
    waits = {role: (at, scrape.wait_totals(at)) for role, at in instances.items() if at}
    proxy_waits = scrape.wait_totals(url, scrape.PROXY_WAITS) if system.is_pd else None
    with CpuMeter() as meter:
        result = run_workload(url, model, settings, workload, workdir, seed)
    # Other work on the machine shows here first (the run's own processes count too).
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["cpu_cores"] = {g: round(v / meter.wall_s, 3) for g, v in meter.seconds.items()}
    result["run_queue_wait"] = {g: round(v / meter.wall_s, 4) for g, v in meter.waited_s.items()}
    itl_after = scrape.engine_itl_buckets(system.decode_url)
    # Which instance the requests queued on (a backlog shows here as a growing queue).
    result["instance_wait_mean_ms"] = {
        role: scrape.wait_means_ms(before, scrape.wait_totals(at))
        for role, (at, before) in waits.items()
    }
    if proxy_waits is not None:
        after = scrape.wait_totals(url, scrape.PROXY_WAITS)
        result["proxy_wait_mean_ms"] = scrape.wait_means_ms(proxy_waits, after, scrape.PROXY_WAITS)
    result["engine_itl_ms_at_most"] = {
        f"p{q}": scrape.bucket_quantile_ms(itl_before, itl_after, q / 100) for q in (50, 90, 99)
    }
    if handoffs is not None and result.get("completed"):
        result["first_token_handoffs"] = scrape.share(handoffs, scrape.first_token_handoffs(url))
    return result
