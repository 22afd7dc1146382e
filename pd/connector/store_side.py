"""The node's KV store behind PDConnector: look up and load stored prefixes, save finished ones.

Scheduler side (``StoreScheduler``, engine-core process)
    ``get_num_new_matched_tokens``: beyond vLLM's own prefix-cache hit, the longest
    prefix of the request's block hashes the store holds is reported as an
    asynchronous external load (never the prompt's last token: vLLM must compute
    one token to sample from). ``update_state_after_alloc`` pairs those hashes with
    the block ids vLLM allocated; ``request_finished`` picks the full blocks not yet
    stored. Both go to the workers in the step's ``PDConnectorMetadata``.

Worker side (``StoreWorker``, each worker process)
    Loads: a thread reads the payloads (``StoreClient.get_many``) and scatters them
    into the allocated blocks; a block the store no longer has (or a damaged one) is
    reported through ``get_block_ids_with_load_errors``, so vLLM recomputes from that
    block on: slower, same output.
    Saves: ``request_finished`` keeps the request's blocks allocated (delay free) until
    the worker copied them out. A copy on the engine thread in ``start_load_kv`` would
    not be safe: vLLM starts loads after launching the step's forward, which may
    already be writing freed blocks reused by a new request. So a copier thread
    copies the held blocks into one host array per request (``gather_blocks``) and
    reports the request done (its blocks are freed at the next step); a putter thread,
    at a lower priority, then asks the store which leading blocks it already holds
    (another instance may have saved them) and puts the rest, a few blocks per call,
    each put deferred while the engine is stepping (at most ``MAX_DEFER_S``). Both
    queues are bounded (requests to copy, bytes to put): a full one skips the save
    and counts it; the engine never waits.

Only requests that do not load from a prefill peer (no ``do_remote_prefill``) use the
store's loads; a P/D prefill instance loads stored prefixes like any other instance.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pd.store.affinity import allow_all_cpus
from pd.store.config import StoreConfig
from pd.store.keys import StoreNamespace, weights_identity
from pd.store.tiered import PrefixHit
from pd.transfer.metadata import StoreBlocks
from pd.transfer.stats import TransferCounters, tier_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from pd.store.client import StoreClient
    from pd.transfer.layout import KVCacheLayout

logger = logging.getLogger(__name__)

# Hashes the scheduler knows are stored (loaded or saved by it), not saved again.
KNOWN_STORED_MAX = 65536
# A request's lookup answer is reused for its next ask within this long (vLLM asks
# again each step while it cannot allocate the request's blocks); RECENT_LOOKUPS_MAX
# bounds the answers kept (a request that is never allocated nor finished is dropped).
LOOKUP_REUSE_S = 1.0
RECENT_LOOKUPS_MAX = 1024
# Finished requests waiting for the copier thread; more are skipped and counted.
SAVE_QUEUE_MAX = 32
# Copied blocks waiting for the putter thread, in bytes; a save past it is skipped
# and counted (the engine never waits, and a store that cannot keep up costs misses).
PUT_QUEUE_MAX_BYTES = 256 * 2**20
# Blocks per put: a 2k-token prompt of the small model (16 MiB) goes as 4 puts, so
# the store answers another instance's get between them and frees each chunk sooner.
SAVE_CHUNK_BLOCKS = 4
# The putter yields to the engine: before each put it waits for the engine to be
# quiet (no step ended for ENGINE_QUIET_S), at most MAX_DEFER_S, so puts land in
# the gaps between bursts of work and, under steady load, one per MAX_DEFER_S.
ENGINE_QUIET_S = 0.02
MAX_DEFER_S = 0.1
# The putter thread's nice value (Linux: per thread): the kernel gives the engine's
# threads the cores first. The copier keeps the default: it holds KV blocks.
PUTTER_NICE = 10


def store_namespace(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, tp_rank: int
) -> StoreNamespace:
    """What makes this worker's KV blocks interchangeable, from vLLM's config alone.

    The scheduler and the workers build it alike (the scheduler never sees the KV
    tensors); ``bytes_per_block`` pins the memory layout the workers then check.
    """
    from vllm.platforms import current_platform

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    try:
        weights_id = weights_identity(model_config.model)
    except (FileNotFoundError, OSError):
        # A hub name: its revision is the best identity we have without the files.
        weights_id = f"hub:{model_config.model}@{model_config.revision or 'main'}"
    extra: list[tuple[str, str]] = [("device", str(current_platform.device_type))]
    if parallel.pipeline_parallel_size > 1:
        extra.append(("pp_size", str(parallel.pipeline_parallel_size)))
    kv_layout = "default"
    if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        num_layers = len(group.layer_names)
        num_kv_heads = int(getattr(spec, "num_kv_heads", 0) or 0)
        head_dim = int(getattr(spec, "head_size", 0) or 0)
        kv_dtype = str(getattr(spec, "dtype", cache.cache_dtype)).removeprefix("torch.")
        kv_layout = f"{type(spec).__name__} {kv_cache_config.kv_cache_layout or 'default'}"
        extra.append(("bytes_per_block", str(bytes_per_block_id(kv_cache_config))))
    else:
        num_layers = model_config.get_num_layers(parallel)
        num_kv_heads = model_config.get_num_kv_heads(parallel)
        head_dim = model_config.get_head_size()
        kv_dtype = str(model_config.dtype).removeprefix("torch.")
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if backend is not None:
        kv_layout += f" {getattr(backend, 'name', backend)}"
    return StoreNamespace(
        model=str(model_config.model),
        weights_id=weights_id,
        kv_dtype=kv_dtype,
        block_size=cache.block_size,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kv_layout=kv_layout,
        tp_size=parallel.tensor_parallel_size,
        tp_rank=tp_rank,
        block_hash_algo=str(cache.prefix_caching_hash_algo),
        extra=tuple(extra),
    )


def bytes_per_block_id(kv_cache_config: KVCacheConfig) -> int:
    """Bytes one block id spans over all KV tensors, as vLLM sized them."""
    total = sum(t.size for t in kv_cache_config.kv_cache_tensors)
    return total // max(1, kv_cache_config.num_blocks)


def lookup_counts(asked_blocks: int, found: PrefixHit, block_size: int) -> dict[str, int]:
    """A lookup's hits and misses in tokens, overall and by tier (see ``TIER_COUNTERS``)."""
    host_misses = asked_blocks - found.host_blocks
    disk_misses = host_misses - found.disk_blocks
    return {
        "store_hit_tokens": found.num_blocks * block_size,
        "store_miss_tokens": disk_misses * block_size,
        tier_key("store_tier_hit_tokens", "host"): found.host_blocks * block_size,
        tier_key("store_tier_miss_tokens", "host"): host_misses * block_size,
        tier_key("store_tier_hit_tokens", "disk"): found.disk_blocks * block_size,
        tier_key("store_tier_miss_tokens", "disk"): disk_misses * block_size,
    }


def extra_store_config(raw: dict[str, Any] | None) -> StoreConfig | None:
    """``kv_connector_extra_config["store"]`` as a ``StoreConfig``; None when off."""
    if raw is None:
        return None
    try:
        config = StoreConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"kv_connector_extra_config store.{e}") from None
    return config if config.enabled else None


@dataclass
class _PendingLoad:
    first_block: int
    block_hashes: list[bytes]


class StoreScheduler:
    """The scheduler side: lookups, and which blocks to load and to save."""

    def __init__(
        self, client: StoreClient, namespace: StoreNamespace, block_size: int, save_decode: bool
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._block_size = block_size
        self._save_decode = save_decode
        self._pending: dict[str, _PendingLoad] = {}
        # request id -> ((first block, blocks asked), answer, good until): a request
        # vLLM could not allocate is asked about again next step, at the queue's head.
        self._recent: dict[str, tuple[tuple[int, int], PrefixHit, float]] = {}
        self._loads: list[StoreBlocks] = []
        self._saves: list[StoreBlocks] = []
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._holding: set[str] = set()  # saves whose blocks vLLM keeps until copied
        # Requests whose blocks a load (the store's or a prefill instance's) still fills:
        # nothing of theirs is valid to save. vLLM marks a request finished before
        # ``request_finished``, so its status cannot say so for an aborted one.
        self._loading: set[str] = set()
        self.counters = TransferCounters()
        client.register(namespace)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        first = num_computed_tokens // self._block_size
        # The last token is always computed here: vLLM samples from its logits.
        last = (request.num_tokens - 1) // self._block_size
        hashes = [bytes(h) for h in request.block_hashes[first:last]]
        self._pending.pop(request.request_id, None)
        if not hashes:
            return 0, False
        now = time.monotonic()
        recent = self._recent.get(request.request_id)
        if recent is not None and recent[0] == (first, len(hashes)) and now < recent[2]:
            # Asked again (vLLM found no room for it last step): the answer a moment
            # ago stands; a block evicted since fails its load and is recomputed.
            found = recent[1]
        else:
            started = time.perf_counter()
            found = self._client.lookup(self._namespace, hashes)
            self.counters.observe(store_lookup_seconds=time.perf_counter() - started)
            self.counters.add(**lookup_counts(len(hashes), found, self._block_size))
            self._recent[request.request_id] = ((first, len(hashes)), found, now + LOOKUP_REUSE_S)
            while len(self._recent) > RECENT_LOOKUPS_MAX:
                self._recent.pop(next(iter(self._recent)))
        hit = found.num_blocks
        if hit == 0:
            return 0, False
        self._remember(hashes[:hit])  # stored: never saved again, loaded or not
        self._pending[request.request_id] = _PendingLoad(first, hashes[:hit])
        return hit * self._block_size, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._recent.pop(request.request_id, None)  # allocated: no lookup again
        if num_external_tokens > 0:
            self._loading.add(request.request_id)
        pending = self._pending.pop(request.request_id, None)
        if pending is None or num_external_tokens == 0:
            return
        num_blocks = num_external_tokens // self._block_size
        assert num_blocks <= len(pending.block_hashes), "vLLM loads at most what we offered"
        (block_ids,) = blocks.get_block_ids()
        load_ids = block_ids[pending.first_block : pending.first_block + num_blocks]
        self._loads.append(
            StoreBlocks(
                request_id=request.request_id,
                block_hashes=tuple(pending.block_hashes[:num_blocks]),
                block_ids=tuple(load_ids),
            )
        )
        self._remember(pending.block_hashes[:num_blocks])

    def request_finished(
        self, request: Request, block_ids: Sequence[int], reports_completion: bool
    ) -> bool:
        """Queue the request's full blocks not known stored; whether it holds the blocks.

        With ``reports_completion`` the worker reports the request in
        ``finished_sending`` once it copied them (the caller returns delay-free True);
        without, someone else already holds the blocks (a prefill lease) and reports.
        """
        self._pending.pop(request.request_id, None)
        self._recent.pop(request.request_id, None)
        if request.request_id in self._loading:
            return False  # aborted while its blocks are being filled: nothing to save
        tokens = request.num_computed_tokens
        if not self._save_decode:
            tokens = min(tokens, request.num_prompt_tokens)
        num_full = min(tokens // self._block_size, len(request.block_hashes), len(block_ids))
        hashes: list[bytes] = []
        ids: list[int] = []
        for i in range(num_full):
            block_hash = bytes(request.block_hashes[i])
            if block_hash in self._known:
                self._known.move_to_end(block_hash)
                continue
            hashes.append(block_hash)
            ids.append(block_ids[i])
        if not hashes:
            return False
        self._remember(hashes)
        self._saves.append(
            StoreBlocks(
                request_id=request.request_id,
                block_hashes=tuple(hashes),
                block_ids=tuple(ids),
                reports_completion=reports_completion,
            )
        )
        if reports_completion:
            self._holding.add(request.request_id)
        return reports_completion

    def loads_ended(self, request_ids: Iterable[str]) -> None:
        """The workers' ``finished_recving`` (failed loads too): those blocks are settled."""
        self._loading.difference_update(request_ids)

    def saves_copied(self, request_ids: Iterable[str]) -> None:
        """The workers' ``finished_sending``: these requests' blocks are free again."""
        self._holding.difference_update(request_ids)

    @property
    def holds_blocks(self) -> bool:
        """Saves still hold blocks: vLLM must keep stepping (an idle engine would never
        hear they were copied) and may wait for them rather than preempt."""
        return bool(self._holding)

    def take(self) -> tuple[list[StoreBlocks], list[StoreBlocks]]:
        """(loads, saves) since the last call."""
        loads, saves = self._loads, self._saves
        self._loads, self._saves = [], []
        return loads, saves

    def _remember(self, hashes: Sequence[bytes]) -> None:
        for block_hash in hashes:
            self._known[block_hash] = None
            self._known.move_to_end(block_hash)
        while len(self._known) > KNOWN_STORED_MAX:
            self._known.popitem(last=False)

    def close(self) -> None:
        self._client.close()


@dataclass
class StoreResults:
    finished_loads: set[str] = field(default_factory=set)
    failed_block_ids: set[int] = field(default_factory=set)
    copied_saves: set[str] = field(default_factory=set)  # blocks may be freed


class StoreWorker:
    """The worker side: a loader and a saver thread between the KV cache and the store."""

    def __init__(
        self,
        client: StoreClient,
        namespace: StoreNamespace,
        layout: KVCacheLayout,
        counters: TransferCounters,
        expected_bytes_per_block: int | None,
        on_result: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._layout = layout
        self._counters = counters
        self._on_result = on_result
        self._usable = (
            expected_bytes_per_block is None or expected_bytes_per_block == layout.bytes_per_block
        )
        if not self._usable:
            logger.warning(
                "pd: store off on this worker: its KV blocks are %d bytes, vLLM's config "
                "says %d (loads recompute, nothing is saved)",
                layout.bytes_per_block,
                expected_bytes_per_block,
            )
        self._loads: queue.SimpleQueue[StoreBlocks | None] = queue.SimpleQueue()
        self._saves: queue.Queue[StoreBlocks | None] = queue.Queue(SAVE_QUEUE_MAX)
        self._results: queue.SimpleQueue[tuple[StoreBlocks, bool, set[int]]] = queue.SimpleQueue()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._copying: set[str] = set()  # saves not copied out yet
        # Copied saves for the putter; _put_bytes is what they (and the put under way) hold.
        self._puts: deque[_Copied] = deque()
        self._put_bytes = 0
        self._put_cond = threading.Condition()
        self._closing = False
        # When the engine last ended a step (take_results runs once per step): the
        # putter defers to a stepping engine.
        self._last_step = 0.0
        client.register(namespace)
        self._threads = [
            threading.Thread(target=self._load_loop, name="pd-store-load", daemon=True),
            threading.Thread(target=self._copy_loop, name="pd-store-copy", daemon=True),
            threading.Thread(target=self._put_loop, name="pd-store-put", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    def copying(self, request_id: str) -> bool:
        """Whether a save of this request still reads its blocks."""
        with self._lock:
            return request_id in self._copying

    def submit(self, loads: Sequence[StoreBlocks], saves: Sequence[StoreBlocks]) -> None:
        """Called on the engine thread once per step; never waits."""
        for save in saves:
            with self._lock:
                self._in_flight += 1
                self._copying.add(save.request_id)
            try:
                self._saves.put_nowait(save)
            except queue.Full:
                self._counters.add(store_saves_skipped=len(save.block_ids))
                self._done(save, False, set())
        for load in loads:
            with self._lock:
                self._in_flight += 1
            self._loads.put(load)

    def take_results(self) -> StoreResults:
        """Called on the engine thread once per step (also how the putter tells the
        engine is busy)."""
        self._last_step = time.monotonic()
        results = StoreResults()
        while True:
            try:
                blocks, is_load, failed = self._results.get_nowait()
            except queue.Empty:
                return results
            if is_load:
                results.finished_loads.add(blocks.request_id)
                results.failed_block_ids |= failed
            elif blocks.reports_completion:
                results.copied_saves.add(blocks.request_id)

    def close(self) -> None:
        """Stop the threads; copied saves still queued are put first (bounded wait)."""
        self._loads.put(None)
        with contextlib.suppress(queue.Full):  # the copier is stuck: it is a daemon thread
            self._saves.put(None, timeout=5)
        for thread in self._threads:
            thread.join(timeout=10)
        self._client.close()

    def _done(self, blocks: StoreBlocks, is_load: bool, failed: set[int]) -> None:
        with self._lock:
            self._in_flight -= 1
            if not is_load:
                self._copying.discard(blocks.request_id)
        self._results.put((blocks, is_load, failed))
        if self._on_result is not None:
            self._on_result()

    def _load_loop(self) -> None:
        allow_all_cpus()  # started by vLLM's pinned main thread: not its core alone
        while (load := self._loads.get()) is not None:
            failed: set[int] = set()
            started = time.perf_counter()
            try:
                failed = self._load(load)
            except Exception:
                logger.exception("pd: store load of %s crashed; recomputing", load.request_id)
                failed = set(load.block_ids)
            finally:
                self._counters.observe(store_load_seconds=time.perf_counter() - started)
                if failed:
                    self._counters.add(store_load_failures=len(failed))
                self._done(load, True, failed)

    def _load(self, load: StoreBlocks) -> set[int]:
        from pd.store.blocks import scatter_block

        if not self._usable:
            return set(load.block_ids)
        payloads = self._client.get_many(
            self._namespace,
            list(load.block_hashes),
            expected_bytes=len(load.block_hashes) * self._layout.bytes_per_block,
        )
        failed: set[int] = set()
        loaded_bytes = 0
        for block_id, payload in zip(load.block_ids, payloads, strict=True):
            if payload is None:
                failed.add(block_id)
                continue
            try:
                scatter_block(self._layout, block_id, payload)
            except ValueError as e:  # a payload of another size: another layout's
                logger.warning("pd: store block for %s unusable (%s)", load.request_id, e)
                failed.add(block_id)
                continue
            loaded_bytes += len(payload)
        self._counters.add(
            store_blocks_loaded=len(load.block_ids) - len(failed), store_bytes_loaded=loaded_bytes
        )
        return failed

    def _copy_loop(self) -> None:
        from pd.store.blocks import gather_blocks

        allow_all_cpus()
        try:
            while (save := self._saves.get()) is not None:
                started = time.perf_counter()
                rows = None
                try:
                    if self._usable:
                        rows = gather_blocks(self._layout, save.block_ids)
                except Exception:
                    logger.exception(
                        "pd: copying %s's blocks for the store failed", save.request_id
                    )
                finally:
                    self._done(save, False, set())  # the blocks may be freed now
                if rows is not None:
                    self._queue_put(_Copied(save.block_hashes, rows, started))
        finally:
            with self._put_cond:
                self._closing = True
                self._put_cond.notify_all()

    def _queue_put(self, copied: _Copied) -> None:
        with self._put_cond:
            if self._put_bytes + copied.rows.nbytes > PUT_QUEUE_MAX_BYTES:
                self._counters.add(store_saves_skipped=len(copied.block_hashes))
                return
            self._puts.append(copied)
            self._put_bytes += copied.rows.nbytes
            self._put_cond.notify()

    def _put_loop(self) -> None:
        allow_all_cpus()
        lower_thread_priority(PUTTER_NICE)
        while True:
            with self._put_cond:
                while not self._puts and not self._closing:
                    self._put_cond.wait()
                if not self._puts:
                    return
                copied = self._puts.popleft()
            try:
                self._put(copied)
            except Exception:
                logger.exception("pd: putting blocks into the store failed")
            finally:
                with self._put_cond:
                    self._put_bytes -= copied.rows.nbytes

    def _put(self, copied: _Copied) -> None:
        hashes = list(copied.block_hashes)
        # Blocks another instance (or an earlier save the scheduler forgot) stored
        # meanwhile: a lookup is a few hundred bytes, a put a MiB per block.
        held = self._client.lookup(self._namespace, hashes).num_blocks
        stored = 0
        for i in range(held, len(hashes), SAVE_CHUNK_BLOCKS):
            self._defer_to_engine()
            chunk = range(i, min(i + SAVE_CHUNK_BLOCKS, len(hashes)))
            stored += self._client.put_many(
                self._namespace, [(hashes[j], memoryview(copied.rows[j])) for j in chunk]
            )
        self._counters.observe(store_save_seconds=time.perf_counter() - copied.started)
        self._counters.add(
            store_blocks_stored=stored,
            store_bytes_stored=stored * self._layout.bytes_per_block,
            store_save_failures=len(hashes) - held - stored,
            store_saves_already_stored=held,
        )

    def _defer_to_engine(self) -> None:
        """Wait until the engine has been quiet for ENGINE_QUIET_S, at most MAX_DEFER_S."""
        deadline = time.monotonic() + MAX_DEFER_S
        while not self._closing:
            now = time.monotonic()
            quiet_s = now - self._last_step
            if quiet_s >= ENGINE_QUIET_S or now >= deadline:
                return
            time.sleep(min(ENGINE_QUIET_S - quiet_s, deadline - now))


@dataclass
class _Copied:
    """A save copied out of the KV cache: row ``i`` of ``rows`` is ``block_hashes[i]``'s."""

    block_hashes: tuple[bytes, ...]
    rows: np.ndarray
    started: float  # perf_counter when its copy began


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux sets it per thread);
    never lowers it, and does nothing where the OS refuses."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
