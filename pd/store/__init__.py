"""The node's KV store: tiers below the engine's cache that keep KV and give it back.

``keys`` names blocks (a namespace of KV compatibility plus vLLM's block hash),
``host`` and ``disk`` are the tiers, ``tiered`` composes them, ``stats`` counts,
``blocks`` turns a worker's KV cache blocks into payloads and back. docs/store.md
describes the design.
"""

from pd.store.disk import DiskTier, DiskTierInUse
from pd.store.host import HostTier
from pd.store.keys import BlockKey, StoreNamespace, weights_identity
from pd.store.stats import StoreStats, TierStats
from pd.store.tier import Payload, Tier
from pd.store.tiered import PrefixHit, TieredStore

__all__ = [
    "BlockKey",
    "DiskTier",
    "DiskTierInUse",
    "HostTier",
    "Payload",
    "PrefixHit",
    "StoreNamespace",
    "StoreStats",
    "Tier",
    "TierStats",
    "TieredStore",
    "weights_identity",
]
