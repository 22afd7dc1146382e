"""Ask a cluster's Ray actors about themselves, or end one, from a second Ray driver.

Each call runs a short-lived driver in a child process with the cluster's ``ray_env``,
which points ``address='auto'`` at this cluster and no other; the test process itself
never joins Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pd.serve_process import PdServeProcess
from tests.harness.waiting import wait_for

INSTANCES = ("pd-prefill-0", "pd-decode-0")  # configs/local.yaml's
_REPO = Path(__file__).resolve().parents[2]


def in_second_driver(serve: PdServeProcess, code: str, timeout_s: float = 180) -> Any:
    """Run ``code`` in a second Ray driver of ``serve``'s cluster (namespace pd); what it
    assigns to ``result``, as JSON."""
    script = (
        "import dataclasses, json, ray\n"
        "ray.init(address='auto', namespace='pd', logging_level='ERROR')\n"
        f"{code}\n"
        "print(json.dumps(result))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
        env=serve.ray_env, cwd=_REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def actor_info(serve: PdServeProcess, name: str) -> dict[str, Any]:
    """Instance actor ``name``'s InstanceInfo (pd.cluster.actor) as a dict: state, url,
    pid (its vLLM server's), actor_pid (its Ray worker's), incarnation, niceness, ..."""
    return in_second_driver(
        serve, f"result = dataclasses.asdict(ray.get(ray.get_actor({name!r}).info.remote()))"
    )


def actor_infos(serve: PdServeProcess) -> dict[str, dict[str, Any]]:
    """Every instance actor's InstanceInfo as a dict, by name, from one driver."""
    return in_second_driver(
        serve,
        f"result = {{name: dataclasses.asdict(ray.get(ray.get_actor(name).info.remote()))"
        f" for name in {INSTANCES!r}}}",
    )


def kill_actor(serve: PdServeProcess, name: str) -> None:
    """``ray.kill`` of instance actor ``name`` with ``no_restart=False``: Ray ends its
    worker and restarts the actor, as after a crash."""
    in_second_driver(serve, f"ray.kill(ray.get_actor({name!r}), no_restart=False)\nresult = 0")


def wait_restarted(
    serve: PdServeProcess, name: str, incarnation: int, timeout_s: float = 600
) -> dict[str, Any]:
    """Wait until actor ``name`` is ready in its ``incarnation``-th restart (or a later
    one); its info then. Fails at once if the actor reports that its start failed."""
    seen: dict[str, Any] = {}

    def back() -> bool:
        seen.update(actor_info(serve, name))
        assert seen["state"] != "failed", f"{name} failed to restart:\n{serve.log()}"
        return seen["incarnation"] >= incarnation and seen["state"] == "ready"

    assert wait_for(back, timeout_s, interval_s=3), f"{name} not back in {timeout_s}s: {seen}"
    return seen
