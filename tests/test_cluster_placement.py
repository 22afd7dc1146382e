"""Real Ray, no engines: a plan the cluster cannot hold fails within seconds, naming the
instance and the resources; an actor that waits for resources is reported as such."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pd.cluster.config import load_config
from pd.cluster.launcher import Cluster, StartupError
from pd.cluster.placement import PlacementWatch
from pd.cluster.plan import make_plan
from pd.vllm_server import free_port
from tests.harness.waiting import wait_for

pytestmark = pytest.mark.engines  # starts real Ray clusters

BOUND_S = 120  # far below timeouts.startup_s: the failure must not be the timeout's


@pytest.fixture
def own_ray_tmpdir(monkeypatch) -> None:
    # Short: Ray's socket paths under it must fit a Unix socket address.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="pd-ray-", dir="/tmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def plan_of(tmp_path: Path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"model: {{preset: tiny}}\ntimeouts: {{startup_s: 600}}\n"
        f"ray: {{dashboard_port: {free_port()}}}\n{text}"
    )
    return make_plan(load_config(path), available_cores=[0, 1])


def test_a_plan_larger_than_the_local_cluster_fails_within_seconds(tmp_path, own_ray_tmpdir):
    # Neither instance fits, so no actor is ever constructed (no vLLM starts).
    plan = plan_of(
        tmp_path, "prefill: {resources: {cpus: 1000}}\ndecode: {resources: {cpus: 1000}}"
    )
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(StartupError) as failure:
        Cluster(plan, log_dir=tmp_path / "logs").start(progress=lines.append)
    assert time.monotonic() - started < BOUND_S
    message = str(failure.value)
    assert message.startswith("the instances do not fit the local Ray cluster: ")
    for name in ("pd-prefill-0", "pd-decode-0"):
        assert f"{name} needs CPU 1000, more than the machine has in total (CPU " in message
    import ray

    assert not ray.is_initialized()  # start() tore its local cluster down again


def test_an_actor_waiting_for_resources_held_elsewhere_is_named(tmp_path, own_ray_tmpdir):
    import ray

    plan = plan_of(tmp_path, "prefill: {resources: {cpus: 0.5}}\ndecode: {resources: {cpus: 0.5}}")
    ray.init(
        num_cpus=1,
        namespace=plan.config.ray.namespace,
        include_dashboard=True,  # Ray's state API, which says which actors are unplaced
        dashboard_port=plan.config.ray.dashboard_port,
        log_to_driver=False,
    )
    try:

        class Sleeper:  # defined here: Ray ships it by value, not by module name
            def ping(self) -> bool:
                return True

        remote = ray.remote(Sleeper)
        blocker = remote.options(num_cpus=1).remote()
        ray.get(blocker.ping.remote(), timeout=60)  # the cluster's only CPU is taken
        waiting = remote.options(name="pd-prefill-0", num_cpus=0.5).remote()

        lines: list[str] = []
        watch = PlacementWatch(plan, lines.append, report_after_s=0, repeat_s=0)
        assert watch.fail_fast() is None  # it fits the cluster's total: keep waiting
        deadline = time.monotonic() + 60
        expected = "pd-prefill-0: waiting for Ray resources after "
        while not any(line.startswith(expected) for line in lines):
            assert time.monotonic() < deadline, lines
            lines.clear()
            watch.report(["pd-prefill-0"])  # "not started yet" until the state API is up
            time.sleep(0.5)
        line = next(line for line in lines if line.startswith(expected))
        assert line.endswith("needs CPU 0.5; the cluster has CPU 0 free of CPU 1")

        ray.kill(blocker)  # the CPU is free again: the actor is placed, nothing to report
        ray.get(waiting.ping.remote(), timeout=60)

        def reports_nothing() -> bool:
            # Ray's state API lags placement (and may time out under load): poll, bounded.
            lines.clear()
            watch.report(["pd-prefill-0"])
            return lines == []

        assert wait_for(reports_nothing, timeout_s=60), lines

        # The same cluster joined by address: one CPU cannot hold 2 x 1 CPU.
        address = ray.get_runtime_context().gcs_address
        joined = plan_of(
            tmp_path,
            "prefill: {resources: {cpus: 1}}\ndecode: {resources: {cpus: 1}}\n"
            f"ray: {{address: '{address}'}}",
        )
        lines.clear()  # a joined cluster may grow: say so and keep waiting
        assert PlacementWatch(joined, lines.append).fail_fast() is None
        assert lines == [
            "pd-prefill-0 needs CPU 1; the cluster has CPU 1 in total and pd-decode-0 takes "
            "the rest: waiting in case the cluster grows or frees resources "
            "(up to timeouts.startup_s=600s)"
        ]
        # pd-serve --dry-run checks the plan against that cluster's nodes.
        config = tmp_path / "joined.yaml"
        config.write_text(
            "model: {preset: tiny}\nprefill: {resources: {cpus: 1}}\n"
            f"decode: {{resources: {{cpus: 1}}}}\nray: {{address: '{address}'}}\n"
        )
        result = subprocess.run(
            [Path(sys.executable).with_name("pd-serve"), "--config", str(config), "--dry-run"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "does not fit: pd-prefill-0 needs CPU 1; the cluster has CPU 1" in result.stderr
    finally:
        ray.shutdown()
