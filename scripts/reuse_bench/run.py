"""The phases in order. Each system is started, measured and stopped before the next;
the store system is then restarted (store process included, its files dropped from the
page cache) and asked the documents again. Step time comes last, with both systems
started side by side and measured in alternating rounds, so that the machine's load
(other work on the same cores) falls on both alike.

store:  docqa (cold, repeated) -> trace -> lookup on a miss -> stop
        -> restart -> docqa (after restart, from disk) -> stop
vllm:   docqa (cold, repeated) -> trace -> stop
both:   step time, store and vllm rounds alternating -> stop

``parts`` runs a subset (``PARTS``); the caller merges it into an earlier run's results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pd.models import make_model
from pd.vllm_server import VllmServer

from . import docqa, micro, scrape, trace
from .settings import Settings
from .systems import SYSTEMS, drop_page_cache, start, stop_store, store_config


def other_engines() -> int:
    """`vllm serve` processes already running (other work on the machine)."""
    if not shutil.which("pgrep"):
        return -1
    found = subprocess.run(["pgrep", "-f", "vllm serve"], capture_output=True, text=True)
    return len(found.stdout.split())


PARTS = ("docqa", "trace", "lookup", "diskload", "step")


def part_of(phase_name: str) -> str:
    """The part a phase belongs to, by its name ("store docqa cold" -> "docqa")."""
    for part, word in (("docqa", "docqa"), ("trace", "trace"), ("lookup", "lookup"),
                       ("diskload", "disk load"), ("step", "step time")):  # fmt: skip
        if word in phase_name:
            return part
    return "other"


def run(
    settings: Settings, command: str, parts: tuple[str, ...] = PARTS
) -> tuple[dict[str, Any], list[str]]:
    """The phases of ``parts`` on both systems: the results (reuse.json) and the phases
    that failed."""
    model = make_model(settings.model_preset)
    root = Path(tempfile.mkdtemp(prefix="pdrb-"))  # short: the store's socket path
    workdir = root / "logs"
    workdir.mkdir()
    store = store_config(settings, root)
    docs = docqa.documents(settings)
    results: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": settings.as_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "other_vllm_servers_at_start": other_engines(),
        },
        "docqa": {},
        "trace": {"ideal": trace.ideal_reuse(settings.trace_prompts)},
        "micro": {"step_time": {}},
        "phases": [],
        "parts": list(parts),
    }
    failed: list[str] = []
    print(f"logs in {workdir}", flush=True)

    def phase(name: str, server: VllmServer | None, system: str, body: Callable[[], Any]) -> Any:
        """Run one measurement; its counters (none without ``server``: a measurement
        of its own), load and time go with it; a failure is recorded and the run goes
        on."""
        print(f"== {name}", flush=True)
        load = os.getloadavg()[0]

        def counters() -> dict[str, float]:
            if server is None:
                return {}
            return {**scrape.instance_counters(server), **_store(system, store)}

        before = counters()
        start_s = time.monotonic()
        try:
            value = body()
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            value = {"error": f"{e!r}"[:500]}
        else:
            if isinstance(value, dict) and "error" in value:  # e.g. the trace overloaded
                failed.append(name)
        after = counters()
        results["phases"].append({"phase": name, "seconds": round(time.monotonic() - start_s, 1),
                                  "loadavg_1m": [load, os.getloadavg()[0]],
                                  "part": part_of(name)})  # fmt: skip
        if isinstance(value, dict) and server is not None:
            value["counters"] = scrape.delta(before, after)
        print(f"   {_shown(value)}", flush=True)
        return value

    if {"docqa", "trace", "lookup"} & set(parts):
        for system in SYSTEMS:
            server: VllmServer | None = None
            try:
                server = start(system, settings, model, workdir, store, system)
                measure(system, server, settings, model, workdir, store, docs, results, phase,
                        parts)  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                failed.append(f"{system} start")
                results.setdefault("errors", []).append(f"{system}: {e!r}"[:800])
            finally:
                if server is not None:
                    server.stop()
            if system == "store" and "docqa" in parts and "store start" not in failed:
                results["docqa"]["store"]["restarted"] = restarted(
                    settings, model, workdir, store, docs, phase, failed
                )
    if "diskload" in parts:  # against a store process of its own, no engine
        results["micro"]["disk_load"] = phase(
            "store disk load with and without readahead", None, "store",
            lambda: micro.disk_load_readahead(root / "diskload"),
        )  # fmt: skip
    if "step" in parts:
        step_time_side_by_side(settings, model, workdir, store, results, phase, failed)
    stop_store(store)
    shutil.rmtree(root / "disk", ignore_errors=True)
    return results, failed


def step_time_side_by_side(
    settings: Settings, model: Path, workdir: Path, store: dict[str, Any],
    results: dict[str, Any], phase: Callable[..., Any], failed: list[str],
) -> None:  # fmt: skip
    """Both systems started at once (an idle vLLM instance takes no CPU), then the
    step-time load in alternating rounds, into ``results["micro"]["step_time"]``."""
    servers: dict[str, VllmServer] = {}
    try:
        for system in SYSTEMS:
            servers[system] = start(system, settings, model, workdir, store, f"{system}-step")
        value = phase("store and vllm step time", servers["store"], "store",
                      lambda: micro.step_time_paired(servers, settings, store))  # fmt: skip
        value.pop("counters", None)  # the rounds carry their own
        if "error" in value:
            value = {system: {"error": value["error"]} for system in SYSTEMS}
        results["micro"]["step_time"] = value
    except Exception as e:
        traceback.print_exc()
        failed.append("step time start")
        results["micro"]["step_time"] = {system: {"error": f"{e!r}"[:800]} for system in SYSTEMS}
    finally:
        for server in servers.values():
            server.stop()


def measure(
    system: str, server: VllmServer, settings: Settings, model: Path, workdir: Path,
    store: dict[str, Any], docs: list[list[int]], results: dict[str, Any],
    phase: Callable[..., Any], parts: tuple[str, ...],
) -> None:  # fmt: skip
    """The phases of ``parts`` (step time aside) on one started system, into ``results``."""
    url = server.url

    def cold() -> dict[str, Any]:
        return docqa.summary(docqa.ask(url, settings, docs, 0))

    def repeated() -> dict[str, Any]:
        rounds = range(1, settings.repeat_rounds + 1)
        return docqa.summary([t for r in rounds for t in docqa.ask(url, settings, docs, r)])

    if "docqa" in parts:
        rows = results["docqa"].setdefault(system, {})
        rows["cold"] = phase(f"{system} docqa cold", server, system, cold)
        rows["repeated"] = phase(f"{system} docqa repeated", server, system, repeated)
    if "trace" in parts:
        results["trace"][system] = phase(
            f"{system} trace", server, system,
            lambda: trace.replay(url, model, settings, workdir / f"trace-{system}.json"),
        )  # fmt: skip
    if system == "store" and "lookup" in parts:
        results["micro"]["lookup_on_miss"] = phase(
            "store lookup on a miss", server, system, lambda: micro.lookup_on_miss(store, settings)
        )


def restarted(
    settings: Settings, model: Path, workdir: Path, store: dict[str, Any],
    docs: list[list[int]], phase: Callable[..., Any], failed: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The whole system restarted (instance and store process; the disk tier's files
    out of the page cache), then each document asked once more."""
    server: VllmServer | None = None
    try:
        stop_store(store)
        files = drop_page_cache(Path(store["disk_path"]))
        server = start("store", settings, model, workdir, store, "store-restarted")
        url = server.url
        value: dict[str, Any] = phase(
            "store docqa after restart", server, "store",
            lambda: docqa.summary(docqa.ask(url, settings, docs, settings.repeat_rounds + 1)),
        )  # fmt: skip
        value["disk_files_dropped_from_page_cache"] = files
        return value
    except Exception as e:
        traceback.print_exc()
        failed.append("store restart")
        return {"error": f"{e!r}"[:800]}
    finally:
        if server is not None:
            server.stop()


def _store(system: str, store: dict[str, Any]) -> dict[str, float]:
    return scrape.store_counters(store) if system == "store" else {}


def _shown(value: Any) -> str:
    if not isinstance(value, dict):
        return repr(value)[:200]
    if "error" in value:
        return f"failed: {value['error'][:300]}"
    keys = ("p50_ms", "mean_ms", "p50_ttft_ms", "p90_ttft_ms", "completed", "engine_step_ms",
            "wall_s")  # fmt: skip
    shown = {k: round(v, 2) for k, v in value.items() if k in keys and isinstance(v, float | int)}
    counters = value.get("counters", {})
    hits = {k: counters[k] for k in ("prefix_cache_hits", "store_hit_tokens", "host_hit_tokens",
                                     "disk_hit_tokens") if counters.get(k)}  # fmt: skip
    return f"{shown} hits(tokens) {hits}"
