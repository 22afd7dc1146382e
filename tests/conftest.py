"""Shared fixtures. Engines are expensive on CPU: start each once per session.

vLLM servers: the reference (``reference_server``) for the whole session. pd-serve
clusters: one ``ClusterPool`` for the session, one cluster running at a time; each
``*_cluster`` fixture asks it for its config, so that consecutive modules of the same
config share a start-up. A cluster is stopped as soon as the next module does not use
it, so it never runs beside another module's engines. The run's summary counts the
start-ups.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from pd.models import make_model
from pd.serve_process import PdServeProcess
from pd.vllm_server import VllmServer
from tests.harness import clusters, vllm
from tests.harness.vllm import test_server

# Tests not marked `engines` cannot start one (so `-m "not engines"` starts none).
pytest_plugins = ["tests.harness.engine_guard"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_model("tiny")


@pytest.fixture(scope="session")
def reference_server(tiny_model) -> Iterator[VllmServer]:
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


_POOL = clusters.ClusterPool()
# The fixtures that take a cluster from the pool, by name.
CLUSTER_FIXTURES = ("local_cluster", "concurrent_cluster", "first_token_cluster", "fault_cluster")


@pytest.fixture(scope="session")
def cluster_pool() -> Iterator[clusters.ClusterPool]:
    try:
        yield _POOL
    finally:
        _POOL.close()


def _clusters_used(item: pytest.Item | None) -> set[str]:
    return set(CLUSTER_FIXTURES) & set(getattr(item, "fixturenames", ()))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """At a module's end, stop its cluster unless the next module starts with the same."""
    leaving_module = nextitem is None or getattr(nextitem, "module", None) is not getattr(
        item, "module", None
    )
    if leaving_module and not _clusters_used(item) & _clusters_used(nextitem):
        _POOL.close()


@pytest.fixture(scope="module")
def local_cluster(cluster_pool) -> PdServeProcess:
    """pd-serve on configs/local.yaml, ready."""
    return cluster_pool.get(clusters.LOCAL)


@pytest.fixture(scope="module")
def concurrent_cluster(cluster_pool) -> PdServeProcess:
    """configs/local.yaml with ``proxy.flow: concurrent``, ready."""
    return cluster_pool.get(clusters.CONCURRENT_FLOW)


@pytest.fixture(scope="module")
def first_token_cluster(cluster_pool) -> PdServeProcess:
    """configs/local.yaml with ``proxy.flow: first-token``, ready."""
    return cluster_pool.get(clusters.FIRST_TOKEN_FLOW)


@pytest.fixture(scope="module")
def fault_cluster(cluster_pool) -> PdServeProcess:
    """configs/local.yaml with the fault scenarios' short deadlines, ready."""
    return cluster_pool.get(clusters.FAULTS)


def pytest_terminal_summary(terminalreporter) -> None:
    if clusters.ClusterPool.started or vllm.started[0]:
        terminalreporter.write_line(
            f"engine start-ups: {clusters.ClusterPool.started} pd-serve clusters, "
            f"{vllm.started[0]} single vLLM servers"
        )
