"""Fault and load scenarios against a real pd-serve: run by scripts/reliability.py (which
writes docs/reliability.md) and by tests/test_faults.py.

A scenario is an async function that injects one fault on a running cluster
(``pd.serve_process.PdServeProcess``: real Ray actors, real vLLM engines), sends
requests around it and records what happened in a ``ScenarioResult``; ``run_scenario``
then restores the cluster and audits what every fault must leave behind.

    client.py   send one request, classify how it ended (completed, error, lost, hung)
    results.py  what a scenario recorded; the Scenario type
    probes.py   what a scenario reads from the cluster, and the waits built on it
    runner.py   run one scenario, restore the cluster, audit it; warm_up
    throttle.py slow an instance down from a process of its own (throttle_process.py)
    faults/     the fault scenarios and the config they run on
    load.py     the load scenario
    report.py   docs/reliability.md

Why under scripts/ and not tests/: scripts must not import tests, tests may import
scripts. This is pytest-free code that a user runs as a script (the reliability report)
and that the suite runs too, so it lives with the script; tests/harness adds only the
pytest side (fixtures, the shared cluster pool). The pd package holds what a user of pd
needs (the pd-serve launcher, pd.serve_process), not fault injection.
"""
