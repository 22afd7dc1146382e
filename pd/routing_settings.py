"""The settings of ``routing: kv_aware``, declared once: the proxy's policy reads them,
and cluster.yaml's ``proxy.kv_aware`` takes its defaults from here (``kv_aware_default``).
docs/routing.md explains how each is used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class KVAwareSettings:
    queued_token_weight: float = 0.5
    """Prefill: what one prompt token already queued on an instance costs, against one
    token this request would compute there (its prompt minus the prefix it holds)."""
    decode_affinity_slack: int = 2
    """Decode: the instance holding the longest prefix of the prompt is chosen while it
    has at most this many requests in flight more than the least loaded one."""
    decode_only_cached_fraction: float | None = 0.9
    """Conditional disaggregation: no prefill leg (decode prefills the rest itself) when
    the chosen decode instance holds at least this fraction of the prompt's tokens;
    null: never for this reason."""
    decode_only_max_uncached_tokens: int = 128
    """Conditional disaggregation: no prefill leg when the tokens the chosen decode
    instance would compute itself (prompt minus the prefix it holds) are at most this
    many; 0: never for this reason."""
    decode_only_token_weight: float | None = 2.0
    """Conditional disaggregation: no prefill leg when this many times the tokens decode
    would compute itself costs no more than the best prefill instance's estimate (its
    uncached tokens plus its weighted queue). Above 1: a token prefilled on decode
    delays the decoding requests there, so it counts more than one on a prefill
    instance. null: never for this reason."""
    expected_block_ttl_s: float = 30.0
    """How long the blocks of a prompt just routed count as held on the instance that
    will compute them, before its KV events say so (a conversation's next turn then
    follows the one still queued); 0: only what the events say."""
    max_blocks_per_instance: int = 262_144
    """The index's memory bound: block hashes remembered per instance (about 100 bytes
    each); past it the longest-held go first (a miss then, never a wrong answer)."""
    replay_timeout_s: float = 2.0
    """How long the proxy waits for an instance's replay of KV events it missed; past
    it the instance's index entries are dropped and rebuilt from what comes next."""

    def __post_init__(self) -> None:
        if self.queued_token_weight < 0:
            raise ValueError("queued_token_weight must be at least 0")
        if self.decode_affinity_slack < 0:
            raise ValueError("decode_affinity_slack must be at least 0")
        fraction = self.decode_only_cached_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError("decode_only_cached_fraction must be in (0, 1], or null")
        if self.decode_only_max_uncached_tokens < 0:
            raise ValueError("decode_only_max_uncached_tokens must be at least 0")
        weight = self.decode_only_token_weight
        if weight is not None and weight <= 0:
            raise ValueError("decode_only_token_weight must be positive, or null")
        if self.expected_block_ttl_s < 0:
            raise ValueError("expected_block_ttl_s must be at least 0")
        if self.max_blocks_per_instance < 1:
            raise ValueError("max_blocks_per_instance must be at least 1")
        if self.replay_timeout_s <= 0:
            raise ValueError("replay_timeout_s must be positive")


def kv_aware_default(name: str) -> Any:
    """The default of one setting, for the cluster schema (``pd.cluster.config``)."""
    return {f.name: f.default for f in fields(KVAwareSettings)}[name]
