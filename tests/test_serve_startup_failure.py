"""A model vLLM cannot load: pd-serve says which instance failed and why, leaves nothing."""

from __future__ import annotations

import socket
import subprocess

import pytest

from pd.serve_process import PdServeProcess

pytestmark = pytest.mark.engines


def test_unloadable_model_fails_clearly_and_leaves_nothing(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    config = {
        "model": {"path": str(not_a_model), "served_name": "broken"},
        "timeouts": {"startup_s": 300},
    }
    serve = PdServeProcess(config, tmp_path, split_stderr=True).start()
    returncode = serve.wait_exit(timeout_s=400)
    assert returncode == 1, serve.log(2000) + serve.stderr()[-2000:]
    stderr = serve.stderr()
    assert "start-up failed: pd-" in stderr
    assert "vLLM exited during start-up" in stderr
    assert "last lines of its log" in stderr
    leftovers = subprocess.run(
        ["pgrep", "-af", "raylet|gcs_server|served-model-name broken"],
        capture_output=True,
        text=True,
    ).stdout
    assert leftovers == "", leftovers


def test_taken_proxy_port_fails_before_anything_starts(tmp_path):
    """The proxy's port is bound first: taken, pd-serve says so and starts no instance."""
    never_loaded = tmp_path / "never-loaded"
    never_loaded.mkdir()
    (never_loaded / "config.json").write_text("{}")
    config = {"model": {"path": str(never_loaded), "served_name": "taken-port"}}
    serve = PdServeProcess(config, tmp_path, split_stderr=True)
    with socket.create_server(("127.0.0.1", serve.port)):
        returncode = serve.start().wait_exit(timeout_s=120)
    assert returncode == 1, serve.log(2000) + serve.stderr()[-2000:]
    assert f"proxy.port: 127.0.0.1:{serve.port} is already in use" in serve.stderr()
    assert "starting" not in serve.log(), serve.log(2000)  # no instance, no Ray
