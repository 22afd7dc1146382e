"""``routing: kv_aware``: send each request where its prefix already is.

The proxy hashes the prompt's full blocks as the instances do
(``pd.proxy.block_hashing``) and asks the index (``pd.proxy.kv_index``, fed by the
instances' KV events) how long a prefix each instance holds. Then (docs/routing.md):

- decode: the least loaded instance (requests in flight), unless one within
  ``decode_affinity_slack`` requests of it holds a longer prefix: that one (a
  conversation's next turn finds its KV there);
- prefill on the instance of least estimated cost: the tokens it would compute
  (prompt minus the prefix it holds) plus ``queued_token_weight`` times the prompt
  tokens already queued on it;
- no prefill leg (conditional disaggregation) when the chosen decode instance would
  compute little itself: it holds at least ``decode_only_cached_fraction`` of the
  prompt, or what it lacks is at most ``decode_only_max_uncached_tokens``, or
  ``decode_only_token_weight`` times what it lacks costs no more than the best prefill
  instance's estimate (decode holds a conversation's last turns, which a prefill
  instance would compute again);
- the instance that will compute the prompt (the prefill instance, or decode on a
  decode-only route) is expected to hold its blocks from now on (``KVIndex.expect``,
  for ``expected_block_ttl_s`` or until its events say so): a conversation's next turn,
  arriving while this one is still queued, follows it there.

A request whose token ids the proxy cannot tell (several prompts, no tokenizer) is
routed by load alone, as ``least_loaded`` does. Every decision is a ``Route.decision``
(counted in ``pd_routing_decisions_total``) and logged at debug level.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import lru_cache

from pd.proxy.block_hashing import BlockHasher
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_events import EventEndpoints, EventFeeds
from pd.proxy.kv_index import KVIndex
from pd.proxy.routing import (
    DECODE_ONLY,
    NO_PREFILL,
    PREFILL,
    Route,
    RoutingPolicy,
    RoutingRequest,
)
from pd.routing_settings import KVAwareSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holding:
    """How much of one request's prompt one instance holds."""

    instance: Instance
    cached_tokens: int


class KVAware(RoutingPolicy):
    name = "kv_aware"

    def __init__(
        self,
        settings: KVAwareSettings | None = None,
        endpoints: dict[str, EventEndpoints] | None = None,
        hash_algorithm: str = "sha256",
        hash_seed: str | None = None,
        index: KVIndex | None = None,
    ) -> None:
        """``endpoints``: each instance's KV event sockets (none: the index is fed by
        whoever holds ``index``, as the unit tests do); ``hash_algorithm``/``hash_seed``:
        the instances' ``--prefix-caching-hash-algo`` and ``PYTHONHASHSEED``."""
        self.settings = settings or KVAwareSettings()
        self.index = index or KVIndex(self.settings.max_blocks_per_instance)
        BlockHasher(1, hash_algorithm, hash_seed)  # an algorithm it cannot reproduce: now
        self._algorithm, self._seed = hash_algorithm, hash_seed
        self.hasher = lru_cache(maxsize=8)(self._make_hasher)
        self.feeds = (
            EventFeeds(
                endpoints, self.index,
                replay_timeout_s=self.settings.replay_timeout_s, hasher_for=self.hasher,
            )
            if endpoints
            else None
        )  # fmt: skip

    def _make_hasher(self, block_size: int) -> BlockHasher:
        return BlockHasher(block_size, self._algorithm, self._seed)

    async def run(self, pool: InstancePool) -> None:
        if self.feeds is not None:
            await self.feeds.run(pool)

    async def route(
        self, request: RoutingRequest, prefills: list[Instance], decodes: list[Instance]
    ) -> Route:
        ids = await request.token_ids()
        if ids is None:
            return self._by_load(prefills, decodes)
        n = len(ids)
        salt = request.body.get("cache_salt")
        salt = salt if isinstance(salt, str) and salt else None
        hashes = {
            size: self.hasher(size).hashes(ids, salt) for size in self.index.block_sizes()
        }  # one size in practice: all instances of a model share it

        def holding(inst: Instance) -> Holding:
            size = self.index.block_size(inst.name)
            blocks = self.index.cached_blocks(inst.name, hashes[size]) if size else 0
            return Holding(inst, min(blocks * (size or 0), n))

        decode = self._decode(holding, decodes)
        uncached = n - decode.cached_tokens
        s = self.settings
        if not prefills:
            return self._decided(Route(None, decode.instance, NO_PREFILL), n, decode, None)

        def cost(h: Holding) -> float:
            queued = h.instance.outstanding_prompt_tokens
            return n - h.cached_tokens + s.queued_token_weight * queued

        prefill = min((holding(p) for p in prefills), key=lambda h: (cost(h), h.instance.name))
        mostly_held = (
            s.decode_only_cached_fraction is not None
            and n > 0
            and decode.cached_tokens >= s.decode_only_cached_fraction * n
        )
        cheaper_on_decode = (
            s.decode_only_token_weight is not None
            and s.decode_only_token_weight * uncached <= cost(prefill)
        )
        if mostly_held or uncached <= s.decode_only_max_uncached_tokens or cheaper_on_decode:
            self._expect(decode.instance, hashes)
            return self._decided(Route(None, decode.instance, DECODE_ONLY), n, decode, prefill)
        self._expect(prefill.instance, hashes)
        return self._decided(Route(prefill.instance, decode.instance, PREFILL), n, decode, prefill)

    def _expect(self, computes: Instance, hashes: dict[int, list[int]]) -> None:
        """``computes`` will hold the prompt's blocks once it has computed them. Decode
        on a prefill route is not expected to: it holds them only once the transfer is
        done, and a decode-only turn that came before would compute them itself."""
        size = self.index.block_size(computes.name)
        if size and size in hashes:
            self.index.expect(computes.name, hashes[size], self.settings.expected_block_ttl_s)

    def _decode(self, holding, decodes: list[Instance]) -> Holding:
        least = min(d.inflight_requests for d in decodes)
        allowed = [
            holding(d)
            for d in decodes
            if d.inflight_requests <= least + self.settings.decode_affinity_slack
        ]
        # The longest prefix held; among equals the least loaded, then by name.
        return min(
            allowed, key=lambda h: (-h.cached_tokens, h.instance.inflight_requests, h.instance.name)
        )

    @staticmethod
    def _decided(
        route: Route, prompt_tokens: int, decode: Holding, prefill: Holding | None
    ) -> Route:
        if logger.isEnabledFor(logging.DEBUG):
            line = (
                "kv_aware: %s: %d prompt tokens; decode %s holds %d%s",
                route.decision, prompt_tokens, decode.instance.name, decode.cached_tokens,
                f"; best prefill {prefill.instance.name} holds {prefill.cached_tokens}, "
                f"{prefill.instance.outstanding_prompt_tokens} queued"
                if prefill else "",
            )  # fmt: skip
            # Written once the route is served, not inside it: formatting and writing a
            # line would count in pd_routing_seconds (scripts/bench_routing.py logs at
            # debug level to see each request's route).
            try:
                asyncio.get_running_loop().call_soon(logger.debug, *line)
            except RuntimeError:  # no loop (a caller outside the proxy): now
                logger.debug(*line)
        return route

    @staticmethod
    def _by_load(prefills: list[Instance], decodes: list[Instance]) -> Route:
        """No token ids: ``least_loaded``'s choice."""
        decode = min(decodes, key=lambda i: (i.inflight_requests, i.name))
        if not prefills:
            return Route(None, decode, NO_PREFILL)
        prefill = min(prefills, key=lambda i: (i.outstanding_prompt_tokens, i.name))
        return Route(prefill, decode, PREFILL)
