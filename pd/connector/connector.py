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

from pd.connector.worker import PDWorker
from pd.decode.scheduler_side import DecodeScheduler
from pd.log import setup_logging
from pd.prefill.scheduler_side import PrefillScheduler
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
        try:
            transports = transport_candidates(self.config.transport)
        except ValueError as e:
            raise ValueError(f"PDConnector: {e}") from None
        engine_id = transfer_config.engine_id

        self._prefill: PrefillScheduler | None = None
        self._decode: DecodeScheduler | None = None
        self._worker: PDWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            # Read by vLLM's scheduler right after this constructor: pd recomputes a
            # prompt whose load failed unless the user asked for "fail".
            transfer_config.kv_load_failure_policy = self.config.load_failure_policy
            if transfer_config.is_kv_producer:
                self._prefill = PrefillScheduler(engine_id, self.config.transport)
            if transfer_config.is_kv_consumer:
                self._decode = DecodeScheduler()
            logger.info(
                "pd: connector ready (engine %s, role %s, transport %s)",
                engine_id,
                transfer_config.kv_role,
                "/".join(transports),
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            assert kv_cache_config is not None, "vLLM passes kv_cache_config to workers"
            self._worker = PDWorker(
                config=self.config,
                transport_names=transports,
                engine_id=engine_id,
                tp_rank=get_tensor_model_parallel_rank(),
                num_blocks=kv_cache_config.num_blocks,
                block_size=vllm_config.cache_config.block_size,
                is_producer=transfer_config.is_kv_producer,
                is_consumer=transfer_config.is_kv_consumer,
            )

    # --- scheduler side ---------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if self._decode is None:
            return 0, False
        return self._decode.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self._decode is not None:
            self._decode.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        metadata = PDConnectorMetadata(idle_step=scheduler_output.total_num_scheduled_tokens == 0)
        if self._prefill is not None:
            metadata.leases, metadata.rendezvous, metadata.failed_rendezvous = (
                self._prefill.take_grants()
            )
        if self._decode is not None:
            metadata.loads, metadata.cancelled_loads = self._decode.take_loads()
        return metadata

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._prefill is not None and _asks_for_decode(request):
            return self._prefill.request_finished(request, block_ids)
        if self._decode is not None:
            self._decode.request_finished(request)
        return False, None

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

    def get_kv_connector_stats(self) -> PDConnectorStats | None:
        return self._worker.stats() if self._worker else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # --- stats ----------------------------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PDConnectorStats:
        return PDConnectorStats(data=data) if data is not None else PDConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> PDPromMetrics:
        return PDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _asks_for_decode(request: Request) -> bool:
    """The request is a prefill leg: its KV is kept for a decode instance."""
    try:
        return bool(KVTransferParams.from_dict(request.kv_transfer_params).do_remote_decode)
    except ValueError:
        return False  # malformed params: PrefillScheduler would refuse them too
