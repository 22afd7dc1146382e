"""The guard that keeps engines out of tests not marked ``engines`` (harness/engine_guard.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness.engine_guard import EngineWithoutMark, engine_started_by


@pytest.mark.parametrize(
    ("args", "engine"),
    [(["/venv/bin/vllm", "serve", "/models/tiny", "--port", "8100"], "vLLM"),
     ("vllm serve /models/tiny", "vLLM"),
     (["/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "Ray"),
     (["/site-packages/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=1"], "Ray"),
     (["sleep", "60"], None),
     ([sys.executable, "-c", "print('vllm serve')"], None),
     (["/venv/bin/vllm", "--version"], None)],
)  # fmt: skip
def test_engine_commands_are_recognised(args, engine):
    found = engine_started_by(args)
    if engine is None:
        assert found is None
    else:
        assert found is not None and engine in found


def test_a_test_without_the_mark_cannot_start_vllm(tmp_path):
    fake = tmp_path / "vllm"  # would it run, it would leave this file behind
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\n")
    fake.chmod(0o755)
    with pytest.raises(EngineWithoutMark, match="not marked `engines`"):
        subprocess.Popen([str(fake), "serve", "tiny"])
    assert not (tmp_path / "ran").exists()
    # Other commands run as ever.
    subprocess.run([str(fake), "--version"], check=True)
    assert (tmp_path / "ran").exists()
