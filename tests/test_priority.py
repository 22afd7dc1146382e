"""pd runs its vLLM engines at normal CPU priority, whatever niceness Ray gave its workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pd.cluster import priority


def _in_child_at_niceness(niceness: int, code: str) -> str:
    """Run ``code`` in a fresh interpreter started at ``niceness``; its stdout."""
    script = f"import os; os.nice({niceness})\n{code}"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def _may_raise_priority() -> bool:
    """Whether a process here may lower its niceness (root with CAP_SYS_NICE, say)."""
    probe = "import os\ntry:\n    os.setpriority(os.PRIO_PROCESS, 0, 0); print('yes')\n"
    probe += "except PermissionError:\n    print('no')"
    return _in_child_at_niceness(5, probe) == "yes"


def test_an_actor_at_rays_niceness_raises_itself_where_allowed():
    code = "from pd.cluster.priority import set_niceness; print(set_niceness(0))"
    expected = "0" if _may_raise_priority() else "15"
    assert _in_child_at_niceness(15, code) == expected


def test_lowering_priority_needs_no_privilege():
    code = "from pd.cluster.priority import set_niceness; print(set_niceness(12))"
    assert _in_child_at_niceness(5, code) == "12"


def test_without_the_privilege_the_niceness_is_reported_unchanged(monkeypatch):
    monkeypatch.setattr(os, "getpriority", lambda which, who: 15)

    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert priority.set_niceness(0) == 15
    warning = priority.niceness_warning("pd-decode-0", 0, 15)
    assert warning is not None
    assert "pd-decode-0" in warning and "niceness 15, not 0" in warning
    assert "RAY_worker_niceness=0" in warning


def test_the_wanted_niceness_is_left_alone(monkeypatch):
    def must_not_be_called(*args: object) -> None:
        raise AssertionError("setpriority called for a process already at its niceness")

    monkeypatch.setattr(os, "setpriority", must_not_be_called)
    if os.getpriority(os.PRIO_PROCESS, 0) != 0:
        pytest.fail("the test process itself should run at niceness 0")
    assert priority.set_niceness(0) == 0
    assert priority.niceness_warning("pd-decode-0", 0, 0) is None


def test_a_local_cluster_starts_its_workers_at_normal_priority(monkeypatch):
    name = priority.RAY_WORKER_NICENESS  # Ray's spelling: RAY_ + its config key
    monkeypatch.delenv(name, raising=False)
    priority.local_ray_env()
    assert os.environ[name] == "0"
    monkeypatch.setenv(name, "5")  # the user's own choice stands
    priority.local_ray_env()
    assert os.environ[name] == "5"
