"""vLLM's KV cache events, received from every instance into the proxy's ``KVIndex``.

Each instance publishes (``--kv-events-config``, set by pd-serve for ``routing:
kv_aware``) on a ZMQ PUB socket: ``(topic, seq, msgpack([ts, events, dp_rank]))``,
``seq`` counting batches from 0 per engine, plus a ROUTER replay socket that sends
the buffered batches from a given ``seq`` on, then an end marker (seq -1).

``EventFeed`` is one instance's subscription. Batches are applied in ``seq`` order:
- the next one is applied;
- one past a gap (a batch lost: PUB drops on overflow, and a subscriber misses what
  was sent before it connected) makes the feed ask the replay socket for the
  missing ones; if the replay cannot fill the gap (no replay socket, buffer moved
  on, no answer in time) the instance's entries are dropped and it starts afresh;
- one from before the expected ``seq`` means the engine started counting again (a
  restart): the instance's entries are dropped and the new engine's batches replayed
  from 0; batches a replay already applied are skipped when they come live.
Every such case costs misses only. The feed also starts with a replay from 0, so
what an instance cached before the proxy subscribed is known too.

``EventFeeds.run`` follows the pool: an instance out of rotation is dropped from
the index and ignored until it is back, then caught up from its replay buffer; one
serving at another URL (a restarted actor) is dropped and caught up from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pd.proxy.block_hashing import BlockHasher, external_hash
from pd.proxy.instances import Instance, InstancePool
from pd.proxy.kv_index import KVIndex

logger = logging.getLogger(__name__)

END_SEQ = -1  # the replay socket's end-of-replay marker (signed)
_WATCH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class EventEndpoints:
    """Where the proxy reaches one instance's event sockets (ZMQ addresses)."""

    publisher: str
    replay: str | None = None


def connect_address(bound: str, instance_url: str | None) -> str:
    """The address to connect to for an endpoint an instance binds: ``tcp://*:P`` is
    reached at the host of the instance's URL; ``ipc://`` and named hosts as they are."""
    if bound.startswith("tcp://*:") and instance_url:
        host = instance_url.split("://", 1)[-1].rsplit(":", 1)[0]
        return f"tcp://{host}:{bound.rsplit(':', 1)[1]}"
    return bound


@dataclass
class FeedStats:
    batches: int = 0  # applied
    gaps: int = 0  # batches found missing
    resyncs: int = 0  # replays that filled a gap (or caught up at start)
    drops: int = 0  # times the instance's entries were dropped (lost events, restarts)
    hash_mismatches: int = 0  # first blocks whose hash the proxy computes differently


class EventFeed:
    """One instance's events into ``index``, in order, resynchronised on gaps."""

    def __init__(
        self,
        name: str,
        endpoints: EventEndpoints,
        index: KVIndex,
        context: zmq.asyncio.Context,
        *,
        replay_timeout_s: float = 2.0,
        hasher_for: Callable[[int], BlockHasher | None] | None = None,
    ) -> None:
        """``hasher_for(block_size)``: the proxy's hasher, to check that a first block it
        hears of hashes as the proxy computes it (a differing seed or algorithm would
        make every lookup miss); None: no check."""
        self.name = name
        self.endpoints = endpoints
        self.stats = FeedStats()
        self._index = index
        self._context = context
        self._replay_timeout_s = replay_timeout_s
        self._hasher_for = hasher_for
        self._decoder = msgspec.msgpack.Decoder()
        self._expected = 0  # the next seq to apply
        self._replayed_upto = -1  # live batches up to this seq were applied by a replay
        self._checked = False  # one first block checked against the proxy's hash
        self._resync_wanted = asyncio.Event()
        self._resync_wanted.set()  # catch up at start
        self._suspended = False

    def reset(self) -> None:
        """Forget the instance and catch up from 0 (it restarted: a new engine)."""
        self._index.drop(self.name)
        self.stats.drops += 1
        self._expected = 0
        self._replayed_upto = -1
        self._checked = False
        self._resync_wanted.set()

    def suspend(self) -> None:
        """The instance left rotation: forget it, and ignore it until ``resume``."""
        self.reset()
        self._resync_wanted.clear()
        self._suspended = True

    def resume(self) -> None:
        """Back in rotation: catch up from 0 (its replay buffer holds what it cached)."""
        if self._suspended:
            self._suspended = False
            self._resync_wanted.set()

    async def run(self, address: Callable[[str], str] = lambda a: a) -> None:
        """Receive until cancelled. ``address`` maps a bound endpoint to its connect address."""
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)  # no silent drops here; PUB's HWM bounds it
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connected = address(self.endpoints.publisher)
        sub.connect(connected)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        try:
            while True:
                target = address(self.endpoints.publisher)
                if target != connected:  # the instance moved (a restarted actor elsewhere)
                    sub.disconnect(connected)
                    sub.connect(target)
                    connected = target
                replay = address(self.endpoints.replay) if self.endpoints.replay else None
                if self._resync_wanted.is_set():
                    self._resync_wanted.clear()
                    await self._resync(replay)
                ready = dict(await poller.poll(timeout=_WATCH_INTERVAL_S * 1000))
                if sub not in ready:
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                await self._receive(seq, frames[2], replay)
        finally:
            sub.close()

    async def _receive(self, seq: int, payload: bytes, replay: str | None) -> None:
        if self._suspended:
            return
        if seq <= self._replayed_upto:
            return  # a replay applied it already
        self._replayed_upto = -1
        if seq < self._expected:  # counting from 0 again: a new engine
            logger.info("kv events: %s started its sequence again; its entries dropped",
                        self.name)  # fmt: skip
            self.reset()
            self._resync_wanted.clear()
        if seq > self._expected:
            self.stats.gaps += 1
            await self._resync(replay)
            if seq <= self._replayed_upto:
                return
            if seq > self._expected:
                self._lost(f"batches {self._expected}..{seq - 1} lost")
        self._apply(seq, payload)

    def _lost(self, what: str) -> None:
        logger.info("kv events: %s: %s; its entries dropped", self.name, what)
        self._index.drop(self.name)
        self.stats.drops += 1

    async def _resync(self, replay: str | None) -> None:
        """Apply the replay socket's batches from the expected seq on. A gap it cannot
        fill drops the entries (here, or in the caller for a live batch past it)."""
        if replay is None:
            return
        start = self._expected
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        try:
            async with asyncio.timeout(self._replay_timeout_s):
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4:
                        continue
                    seq = int.from_bytes(frames[2], "big", signed=True)
                    if seq == END_SEQ:
                        break
                    if seq < self._expected:
                        continue
                    if seq > self._expected:
                        self._lost(f"replay starts at {seq}, not {self._expected}")
                    self._apply(seq, frames[3])
                    self._replayed_upto = seq
        except TimeoutError:
            logger.info("kv events: %s: no replay in %.1f s", self.name, self._replay_timeout_s)
        finally:
            dealer.close()
        if self._expected > start:
            self.stats.resyncs += 1

    def _apply(self, seq: int, payload: bytes) -> None:
        self._expected = seq + 1
        try:
            batch = self._decoder.decode(payload)
            events = batch[1]
        except (msgspec.DecodeError, TypeError, IndexError, KeyError) as e:
            self._lost(f"batch {seq} not readable ({e!r})")
            return
        if not self._checked:
            self._check_hash(events)
        self._index.apply(self.name, events)
        self.stats.batches += 1

    def _check_hash(self, events: list[Any]) -> None:
        """Compare one root block's hash with the proxy's own, once per engine."""
        if self._hasher_for is None:
            self._checked = True
            return
        for event in events:
            if not isinstance(event, dict) or event.get("type") != "BlockStored":
                continue
            size = int(event.get("block_size") or 0)
            tokens = event.get("token_ids") or []
            hashes = event.get("block_hashes") or []
            if event.get("parent_block_hash") is not None or not hashes or len(tokens) < size:
                continue
            if event.get("extra_keys") and event["extra_keys"][0] is not None:
                continue  # salted or multimodal: not a plain chain's first block
            hasher = self._hasher_for(size) if size > 0 else None
            if hasher is None:
                continue
            self._checked = True
            if hasher.first_block(tokens[:size]) != external_hash(hashes[0]):
                self.stats.hash_mismatches += 1
                logger.warning(
                    "kv events: %s hashes blocks differently from the proxy (%s, another "
                    "PYTHONHASHSEED?): kv_aware routing will find no cached prefixes on it",
                    self.name, hasher.algorithm,
                )  # fmt: skip
            return


class EventFeeds:
    """Every instance's feed, following the pool's rotation."""

    def __init__(
        self,
        endpoints: dict[str, EventEndpoints],
        index: KVIndex,
        *,
        replay_timeout_s: float = 2.0,
        hasher_for: Callable[[int], BlockHasher | None] | None = None,
    ) -> None:
        self.index = index
        self._context = zmq.asyncio.Context()
        self.feeds = {
            name: EventFeed(
                name, ends, index, self._context,
                replay_timeout_s=replay_timeout_s, hasher_for=hasher_for,
            )
            for name, ends in endpoints.items()
        }  # fmt: skip

    async def run(self, pool: InstancePool) -> None:
        """Receive every feed and watch the pool, until cancelled."""
        seen: dict[str, tuple[bool, str | None]] = {}
        tasks = [
            asyncio.ensure_future(feed.run(self._address_of(pool, name)))
            for name, feed in self.feeds.items()
            if name in pool.instances
        ]
        try:
            while True:
                for name, feed in self.feeds.items():
                    inst = pool.instances.get(name)
                    if inst is None:
                        continue
                    now = (inst.healthy, inst.url)
                    before = seen.get(name, now)
                    if before[1] != now[1]:
                        feed.reset()  # a restarted actor: a new engine, a new cache
                    if before[0] and not now[0]:
                        feed.suspend()  # out of rotation: its entries go
                    elif now[0] and not before[0]:
                        feed.resume()
                    seen[name] = now
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                await asyncio.sleep(_WATCH_INTERVAL_S)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            self._context.term()

    @staticmethod
    def _address_of(pool: InstancePool, name: str) -> Callable[[str], str]:
        inst: Instance = pool.instances[name]
        return lambda bound: connect_address(bound, inst.url)
