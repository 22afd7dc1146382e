"""Routing policies (unit): which healthy instance serves a request."""

from __future__ import annotations

import pytest

from pd.proxy.instances import Instance
from pd.proxy.routing import LeastLoaded, RoundRobin, make_policy


def instances(role: str, n: int) -> list[Instance]:
    return [Instance(f"pd-{role}-{i}", role, url=f"http://h:{i}", healthy=True) for i in range(n)]


def test_round_robin_cycles_per_role():
    policy = RoundRobin()
    prefill, decode = instances("prefill", 3), instances("decode", 2)
    picked = [policy.pick("prefill", prefill, 10).name for _ in range(4)]
    assert picked == ["pd-prefill-0", "pd-prefill-1", "pd-prefill-2", "pd-prefill-0"]
    assert [policy.pick("decode", decode, 10).name for _ in range(3)] == [
        "pd-decode-0", "pd-decode-1", "pd-decode-0",
    ]  # fmt: skip


def test_round_robin_skips_instances_that_left_rotation():
    policy = RoundRobin()
    prefill = instances("prefill", 3)
    healthy = [prefill[0], prefill[2]]
    assert {policy.pick("prefill", healthy, 1).name for _ in range(4)} == {
        "pd-prefill-0", "pd-prefill-2",
    }  # fmt: skip


def test_least_loaded_prefill_by_prompt_tokens_decode_by_requests():
    policy = LeastLoaded()
    prefill = instances("prefill", 2)
    prefill[0].outstanding_prompt_tokens, prefill[0].inflight_requests = 5000, 1
    prefill[1].outstanding_prompt_tokens, prefill[1].inflight_requests = 100, 3
    assert policy.pick("prefill", prefill, 10).name == "pd-prefill-1"
    decode = instances("decode", 2)
    decode[0].inflight_requests, decode[1].inflight_requests = 7, 2
    assert policy.pick("decode", decode, 10).name == "pd-decode-1"


def test_unknown_policy_is_refused():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")
