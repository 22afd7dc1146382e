"""Shared fixtures. Engines are expensive on CPU: start each once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from pd.models import make_model
from pd.vllm_server import VllmServer
from tests.vllm_server import test_server


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_model("tiny")


@pytest.fixture(scope="session")
def reference_server(tiny_model) -> VllmServer:
    """One plain vLLM instance (no connector, no prefix cache): the correctness oracle."""
    server = test_server(
        "reference", tiny_model, cpu="0", connector=False, args=("--no-enable-prefix-caching",)
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reference(reference_server, tiny_model) -> tuple[OpenAI, str]:
    """An OpenAI client of the oracle, and the model name it serves."""
    return OpenAI(base_url=f"{reference_server.url}/v1", api_key="unused"), str(tiny_model)
