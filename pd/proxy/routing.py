"""Routing policies: which prefill and which decode instance serve a request.

A policy sees only healthy instances of one role and the request's estimated prompt
size; KV-aware routing will be one more implementation of the same interface.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import ClassVar

from pd.proxy.instances import Instance


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        """Choose one of ``candidates`` (never empty) for a request of that role."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count] = {}

    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        turn = next(self._counters.setdefault(role, itertools.count()))
        return sorted(candidates, key=lambda i: i.name)[turn % len(candidates)]


class LeastLoaded(RoutingPolicy):
    """Prefill by outstanding prompt tokens, decode by outstanding requests."""

    name = "least_loaded"

    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        if role == "prefill":
            return min(candidates, key=lambda i: (i.outstanding_prompt_tokens, i.name))
        return min(candidates, key=lambda i: (i.inflight_requests, i.name))


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RoundRobin, LeastLoaded)}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
