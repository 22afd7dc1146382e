"""A model vLLM cannot load: pd-serve says which instance failed and why, leaves nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pd.vllm_server import free_port

pytestmark = pytest.mark.engines


def test_unloadable_model_fails_clearly_and_leaves_nothing(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {{path: {not_a_model}, served_name: broken}}\n"
        f"proxy: {{port: {free_port()}}}\n"
        "timeouts: {startup_s: 300}\n"
    )
    result = subprocess.run(
        [Path(sys.executable).with_name("pd-serve"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "start-up failed: pd-" in result.stderr
    assert "vLLM exited during start-up" in result.stderr
    assert "last lines of its log" in result.stderr
    leftovers = subprocess.run(
        ["pgrep", "-af", "raylet|gcs_server|served-model-name broken"],
        capture_output=True,
        text=True,
    ).stdout
    assert leftovers == "", leftovers
