"""PDConnector: pd's KV connector for vLLM (``KVConnectorBase_V1``).

Load it into any vLLM instance (``pd.transfer.connector`` forwards to this module)::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PDConnector",
        "kv_connector_module_path": "pd.transfer.connector", "kv_role": "kv_both"}'

vLLM creates one connector per process and role. This class only routes vLLM's
calls to the half that owns them:

Scheduler side (engine-core process)
    ``PrefillScheduler`` (``pd.prefill.scheduler_side``): ``request_finished`` leases
    a finished prompt's blocks and returns the ``kv_transfer_params`` for decode.
    ``DecodeScheduler`` (``pd.decode.scheduler_side``):
    ``get_num_new_matched_tokens`` / ``update_state_after_alloc`` turn those params
    into an asynchronous load. ``build_connector_meta`` ships both to the workers.

Worker side (each worker process)
    ``PDWorker`` (``pd.connector.worker``): ``register_kv_caches`` builds the layout,
    transport, producer and consumer; ``start_load_kv`` applies a step's metadata;
    ``get_transfer_results`` reports ended leases and finished or failed loads.

Which halves exist follows ``kv_role``: ``kv_producer`` prefill only,
``kv_consumer`` decode only, ``kv_both`` both (the proxy decides per request).

With ``"store"`` in ``kv_connector_extra_config``, any role also reuses KV through the
node's KV store (``pd.connector.store_side``): a request not loading from a prefill
peer loads the longest stored prefix beyond the local prefix-cache hit, and every
finished request's full blocks are saved.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from pd.connector.store_side import (
    StoreScheduler,
    bytes_per_block_id,
    extra_store_config,
    store_namespace,
)
from pd.connector.worker import PDWorker
from pd.decode.scheduler_side import DecodeScheduler
from pd.log import setup_logging
from pd.prefill.scheduler_side import PrefillScheduler
from pd.transfer import timeline
from pd.transfer.config import PDConnectorConfig
from pd.transfer.metadata import PDConnectorMetadata, PDHandshakeMetadata
from pd.transfer.params import KVTransferParams
from pd.transfer.stats import PDConnectorStats, PDPromMetrics
from pd.transfer.transport import transport_candidates

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class PDConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        setup_logging()
        transfer_config = vllm_config.kv_transfer_config
        assert transfer_config is not None and transfer_config.engine_id is not None
        self.config = PDConnectorConfig.from_extra_config(transfer_config.kv_connector_extra_config)
        kv_on_gpu = vllm_config.device_config.device_type != "cpu"
        try:
            transports = transport_candidates(self.config.transport, kv_on_gpu)
        except ValueError as e:
            raise ValueError(f"PDConnector: {e}") from None
        engine_id = transfer_config.engine_id
        try:
            store_config = extra_store_config(self.config.store)
        except ValueError as e:
            raise ValueError(f"PDConnector: {e}") from None

        self._prefill: PrefillScheduler | None = None
        self._decode: DecodeScheduler | None = None
        self._store: StoreScheduler | None = None
        self._worker: PDWorker | None = None
        self._timed: set[str] = set()  # pd.transfer.timeline: loaded, compute step not yet marked
        if role == KVConnectorRole.SCHEDULER:
            # Read by vLLM's scheduler right after this constructor: pd recomputes a
            # prompt whose load failed unless the user asked for "fail".
            transfer_config.kv_load_failure_policy = self.config.load_failure_policy
            if transfer_config.is_kv_producer:
                self._prefill = PrefillScheduler(engine_id, self.config.transport)
            if transfer_config.is_kv_consumer:
                self._decode = DecodeScheduler()
            if store_config is not None:
                from pd.store.client import StoreClient

                # The scheduler looks up rank 0's blocks; a rank missing one reports it
                # failed and vLLM recomputes it.
                self._store = StoreScheduler(
                    StoreClient(store_config),
                    store_namespace(vllm_config, kv_cache_config, tp_rank=0),
                    block_size=vllm_config.cache_config.block_size,
                    save_decode=store_config.save_decode,
                )
            logger.info(
                "pd: connector ready (engine %s, role %s, transport %s, store %s)",
                engine_id,
                transfer_config.kv_role,
                "/".join(transports),
                store_config.to_dict() if store_config else "off",
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            assert kv_cache_config is not None, "vLLM passes kv_cache_config to workers"
            tp_rank = get_tensor_model_parallel_rank()
            self._worker = PDWorker(
                config=self.config,
                transport_names=transports,
                engine_id=engine_id,
                tp_rank=tp_rank,
                num_blocks=kv_cache_config.num_blocks,
                block_size=vllm_config.cache_config.block_size,
                is_producer=transfer_config.is_kv_producer,
                is_consumer=transfer_config.is_kv_consumer,
                store_config=store_config,
                store_namespace=store_namespace(vllm_config, kv_cache_config, tp_rank)
                if store_config
                else None,
                store_bytes_per_block=bytes_per_block_id(kv_cache_config),
            )

    # --- scheduler side ---------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if _loads_from_prefill(request):
            if self._decode is None:
                return 0, False
            timeline.mark("sched_seen", request.request_id)
            return self._decode.get_num_new_matched_tokens(request, num_computed_tokens)
        if self._store is not None:
            return self._store.get_num_new_matched_tokens(request, num_computed_tokens)
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self._decode is not None:
            self._decode.update_state_after_alloc(request, blocks, num_external_tokens)
        if self._store is not None:
            self._store.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        metadata = PDConnectorMetadata(idle_step=scheduler_output.total_num_scheduled_tokens == 0)
        if self._prefill is not None:
            metadata.leases, metadata.rendezvous, metadata.failed_rendezvous = (
                self._prefill.take_grants()
            )
        if self._decode is not None:
            metadata.loads, metadata.cancelled_loads = self._decode.take_loads()
            if timeline.enabled():
                _mark_decode_step(scheduler_output, metadata, self._timed)
        if self._store is not None:
            metadata.store_loads, metadata.store_saves = self._store.take()
        return metadata

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        delay_free, params = False, None
        if self._prefill is not None and _asks_for_decode(request):
            delay_free, params = self._prefill.request_finished(request, block_ids)
        elif self._decode is not None:
            self._decode.request_finished(request)
        if self._store is not None:
            # Held by a prefill lease already, the blocks outlive the copy: the lease's
            # end frees them (the worker waits for the copy); else the save holds them.
            saving = self._store.request_finished(
                request, block_ids, reports_completion=not delay_free
            )
            delay_free = delay_free or saving
        return delay_free, params

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._decode is not None and connector_output.finished_recving and timeline.enabled():
            for request_id in connector_output.finished_recving:
                timeline.mark("completion_seen", request_id)
                self._timed.add(request_id)
        if self._store is not None:
            if connector_output.finished_recving:
                self._store.loads_ended(connector_output.finished_recving)
            if connector_output.finished_sending:
                self._store.saves_copied(connector_output.finished_sending)

    def has_pending_push_work(self) -> bool:
        return self._store is not None and self._store.holds_blocks

    def has_pending_block_frees(self) -> bool:
        return self._store is not None and self._store.holds_blocks

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        if self._prefill is not None:
            workers = {r: m for r, m in metadata.items() if isinstance(m, PDHandshakeMetadata)}
            self._prefill.set_workers(workers)

    # --- worker side --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.handshake_metadata() if self._worker else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, PDConnectorMetadata)
        self._worker.start_step(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # the decode side pulls; nothing is pushed while prefill runs

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.transfer_results()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker else set()

    def get_kv_connector_stats(self) -> PDConnectorStats | None:
        if self._worker is not None:
            return self._worker.stats()
        # Scheduler side: the store's lookups (hits and misses in tokens).
        return self._store.counters.snapshot() if self._store else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._store is not None:
            self._store.close()

    # --- stats ----------------------------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PDConnectorStats:
        return PDConnectorStats(data=data) if data is not None else PDConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> PDPromMetrics:
        # vLLM builds these in its API server process: the store process's own figures
        # (tiers' usage, evictions, ...) join them there, read when /metrics is scraped.
        transfer_config = vllm_config.kv_transfer_config
        extra = transfer_config.kv_connector_extra_config if transfer_config else {}
        store_config = extra_store_config(PDConnectorConfig.from_extra_config(extra).store)
        if store_config is not None:
            from pd.connector.store_metrics import register_store_collector

            register_store_collector(store_config)
        return PDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _mark_decode_step(
    scheduler_output: SchedulerOutput, metadata: PDConnectorMetadata, timed: set[str]
) -> None:
    """pd.transfer.timeline: the step that hands loads to the workers, and the first step that
    computes a loaded request (its last prompt token; the first token is sampled there)."""
    for spec in metadata.loads:
        if spec.reports_completion:
            timeline.mark("loads_sent", spec.request_id)
    for new in scheduler_output.scheduled_new_reqs:
        if new.req_id in timed:
            timed.discard(new.req_id)
            timeline.mark("compute_scheduled", new.req_id)


def _loads_from_prefill(request: Request) -> bool:
    """The request's prompt KV comes (or came) from a prefill instance: not the store's."""
    try:
        params = KVTransferParams.from_dict(request.kv_transfer_params)
    except ValueError:
        return False
    return bool(params.do_remote_prefill or params.pd_rendezvous)


def _asks_for_decode(request: Request) -> bool:
    """The request is a prefill leg: its KV is kept for a decode instance."""
    try:
        return bool(KVTransferParams.from_dict(request.kv_transfer_params).do_remote_decode)
    except ValueError:
        return False  # malformed params: PrefillScheduler would refuse them too
