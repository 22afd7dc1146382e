"""Routing: which prefill instance (or none) and which decode instance serve a request.

A policy gets the request (``RoutingRequest``: its endpoint and body, a cheap size
estimate, and on demand its token ids as the model's tokenizer makes them) and the
healthy instances of both roles, and chooses the pair in one call (``Route``). A
KV-aware policy weighs where a prompt's blocks are cached against load, for both
roles at once, and may leave prefill out (``Route.prefill`` None: decode prefills
the prompt itself, e.g. when it already holds most of it). The policies here look at
load only, each role on its own; ``kv_aware`` is in ``pd.proxy.kv_routing``. Their
names are registered in ``pd.registry``. Each route names its decision (counted in
``pd_routing_decisions_total{decision}``).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pd.proxy.instances import Instance, InstancePool
from pd.registry import ROUTING_POLICIES


class Tokenizer(Protocol):
    async def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt of one request as token ids; None when it cannot tell."""
        ...


@dataclass
class RoutingRequest:
    """One request, as a routing policy sees it."""

    endpoint: str  # "completions" | "chat/completions"
    body: dict[str, Any]
    tokenizer: Tokenizer | None = None
    _token_ids: list[int] | None = field(default=None, init=False, repr=False)
    _tokenized: bool = field(default=False, init=False, repr=False)
    # How long tokenizing took (pd_routing_tokenize_seconds); None: it did not run
    tokenize_s: float | None = field(default=None, init=False, repr=False)

    async def token_ids(self) -> list[int] | None:
        """The prompt's token ids (chat: its rendered template), tokenized on the first
        call and cached. None when there is no single prompt (a batch of them), no
        tokenizer, or the tokenizer failed: a policy then routes by load."""
        if not self._tokenized:
            if self.tokenizer is not None:
                started = time.monotonic()
                self._token_ids = await self.tokenizer.token_ids(self.endpoint, self.body)
                self.tokenize_s = time.monotonic() - started
            self._tokenized = True
        return self._token_ids

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens: counted if tokenized already, else estimated."""
        if self._token_ids is not None:
            return len(self._token_ids)
        return estimate_prompt_tokens(self.body)


# What a route decided, as ``pd_routing_decisions_total`` counts it.
PREFILL = "prefill"  # both legs: prefill computes, decode loads the KV
DECODE_ONLY = "decode_only"  # the policy left prefill out: decode computes what it lacks
NO_PREFILL = "no_prefill"  # no prefill instance in rotation: decode serves alone


@dataclass(frozen=True)
class Route:
    prefill: Instance | None  # None: decode prefills the prompt itself
    decode: Instance
    decision: str = ""  # PREFILL, DECODE_ONLY or NO_PREFILL; "" reads as what prefill says

    @property
    def kind(self) -> str:
        if self.decision:
            return self.decision
        return PREFILL if self.prefill is not None else NO_PREFILL


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def route(
        self, request: RoutingRequest, prefills: list[Instance], decodes: list[Instance]
    ) -> Route:
        """Choose the pair. ``decodes`` is never empty; with no ``prefills`` (none in
        rotation) the route's prefill is None."""

    async def run(self, pool: InstancePool) -> None:  # noqa: B027
        """Background work while the proxy serves (a KV-aware policy receives the
        instances' KV events); cancelled at shutdown. Nothing by default."""


class PerRole(RoutingPolicy):
    """Each role's instance picked on its own, by ``pick``."""

    async def route(
        self, request: RoutingRequest, prefills: list[Instance], decodes: list[Instance]
    ) -> Route:
        prompt_tokens = request.prompt_tokens
        prefill = self.pick("prefill", prefills, prompt_tokens) if prefills else None
        return Route(prefill, self.pick("decode", decodes, prompt_tokens))

    @abstractmethod
    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        """Choose one of ``candidates`` (never empty) for a request of that role."""


class RoundRobin(PerRole):
    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count] = {}

    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        turn = next(self._counters.setdefault(role, itertools.count()))
        return sorted(candidates, key=lambda i: i.name)[turn % len(candidates)]


class LeastLoaded(PerRole):
    """Prefill by outstanding prompt tokens, decode by outstanding requests."""

    name = "least_loaded"

    def pick(self, role: str, candidates: list[Instance], prompt_tokens: int) -> Instance:
        if role == "prefill":
            return min(candidates, key=lambda i: (i.outstanding_prompt_tokens, i.name))
        return min(candidates, key=lambda i: (i.inflight_requests, i.name))


def make_policy(name: str, **options: Any) -> RoutingPolicy:
    """The policy ``name``, built with ``options`` (only ``kv_aware`` takes any)."""
    policy: RoutingPolicy = ROUTING_POLICIES.load(name)(**options)
    return policy


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Rough prompt size for load balancing (about 4 characters per token)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content", ""))) // 4 + 1 for m in messages if isinstance(m, dict))
    return 1
