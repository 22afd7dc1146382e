"""Faults against one real pd-serve (Ray actors, vLLM engines, pd's connector).

Each test injects one fault with signals on the instances' real vLLM processes
(SIGKILL: a crash, SIGSTOP: a process that stops answering, SIGCONT: it recovers),
sends requests around it and checks that every request completes or fails with a
clear error within a deadline (none lost, none hung), that the cluster heals by
itself, and that the fault left no KV blocks held on any instance and no proxy
connections open. The scenarios live in scripts/scenarios/; scripts/reliability.py
runs the same ones (plus a long load run) and writes docs/reliability.md.

The config is configs/local.yaml with short deadlines (the ``fault_cluster`` fixture:
scripts/scenarios/faults/config.py). Tests run in file order; each leaves the cluster
as it found it.
"""

from __future__ import annotations

import asyncio

import pytest

from pd.serve_process import PdServeProcess
from scripts.scenarios import faults
from scripts.scenarios.load import load_scenario
from scripts.scenarios.results import Scenario, ScenarioResult
from scripts.scenarios.runner import run_scenario, warm_up

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def serve(fault_cluster) -> PdServeProcess:
    return fault_cluster


@pytest.fixture(scope="module")
def baseline_connections(serve) -> int:
    """The idle proxy's connection count, once every instance has been used."""
    return asyncio.run(warm_up(serve))


def run(serve: PdServeProcess, scenario: Scenario, baseline: int) -> ScenarioResult:
    result = asyncio.run(run_scenario(serve, scenario, baseline))
    print(result.summary())
    assert result.outcomes, "the scenario sent no request"
    assert not result.failures(), result.summary()
    # failures() covers these; spelled out, they are the table columns.
    assert result.count("lost") == 0 and result.count("hung") == 0, result.summary()
    assert result.stranded == 0 and result.stranded_blocks, result.summary()
    return result


def test_prefill_stops_answering_leaves_and_rejoins_rotation(serve, baseline_connections):
    run(serve, faults.prefill_stops_answering, baseline_connections)


def test_stalled_transfer_peer_makes_decode_recompute_in_time(serve, baseline_connections):
    run(serve, faults.stalled_transfer_peer, baseline_connections)


def test_decode_stops_answering_requests_end_when_it_leaves_rotation(serve, baseline_connections):
    run(serve, faults.decode_stops_answering, baseline_connections)


def test_request_deadline_ends_a_stream_that_runs_too_long(serve, baseline_connections):
    run(serve, faults.request_deadline, baseline_connections)


def test_prefill_killed_with_requests_in_flight(serve, baseline_connections):
    run(serve, faults.prefill_killed_in_flight, baseline_connections)


def test_decode_killed_mid_stream(serve, baseline_connections):
    run(serve, faults.decode_killed_mid_stream, baseline_connections)


def test_load_burst_after_the_faults(serve, baseline_connections):
    result = run(serve, load_scenario(clients=16, duration_s=15), baseline_connections)
    assert result.count("completed") > 0, result.summary()
