"""Worker-side half of PDConnector: one per vLLM worker (one per TP rank).

Built when vLLM registers its KV cache: describes the cache as regions
(``layout``), starts the transports (under ``auto``: NIXL if it works here and the KV
cache is in GPU memory, and ZMQ), and runs the prefill role's producer (lease table
and side-channel server) and the decode role's consumer as the instance's ``kv_role``
asks: a ``kv_consumer`` serves no side channel (nobody asks a decode instance for KV),
``kv_both`` runs both.

While transfers are pending and nothing else runs, vLLM steps the engine about a
thousand times a second only to poll them (half a core on CPU, taken from whatever
shares it). An idle step therefore waits up to ``IDLE_STEP_WAIT_S`` for a transfer
to end, and returns the moment one does.

With a store configured, ``StoreWorker`` (``pd.connector.store_side``) loads stored
blocks and saves finished ones beside the transports.
"""

from __future__ import annotations

import logging
import threading

import torch

from pd.connector.store_side import StoreWorker
from pd.decode.kv_consumer import KVConsumer
from pd.prefill.kv_producer import KVProducer
from pd.store.config import StoreConfig
from pd.store.keys import StoreNamespace
from pd.transfer import timeline
from pd.transfer.config import PDConnectorConfig
from pd.transfer.layout import KVCacheLayout
from pd.transfer.metadata import PDConnectorMetadata, PDHandshakeMetadata
from pd.transfer.stats import PDConnectorStats, TransferCounters
from pd.transfer.transport import KVTransport, get_transport_class

logger = logging.getLogger(__name__)

# Bounds the delay an idle step adds for a request arriving meanwhile.
IDLE_STEP_WAIT_S = 0.005


class PDWorker:
    def __init__(
        self,
        config: PDConnectorConfig,
        transport_names: list[str],
        engine_id: str,
        tp_rank: int,
        num_blocks: int,
        block_size: int,
        is_producer: bool,
        is_consumer: bool,
        store_config: StoreConfig | None = None,
        store_namespace: StoreNamespace | None = None,
        store_bytes_per_block: int | None = None,
    ) -> None:
        self._config = config
        self._transport_names = transport_names
        self._engine_id = engine_id
        self._tp_rank = tp_rank
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._is_producer = is_producer
        self._is_consumer = is_consumer
        self.counters = TransferCounters()
        self._transports: list[KVTransport] = []
        self._producer: KVProducer | None = None
        self._consumer: KVConsumer | None = None
        self._progress = threading.Event()  # a load or lease ended
        self._idle_step = False
        self._store_config = store_config
        self._store_namespace = store_namespace
        self._store_bytes_per_block = store_bytes_per_block
        self._store: StoreWorker | None = None
        self._load_errors: set[int] = set()
        self._held_sending: set[str] = set()  # lease ended, store copy not yet

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = KVCacheLayout.from_kv_caches(kv_caches, self._num_blocks, self._block_size)
        first = next(iter(kv_caches.values()))
        logger.info(
            "pd: KV cache of %d layers (%s, shape %s, strides %s) -> %d regions of %d blocks, "
            "%d bytes per block id",
            len(kv_caches),
            first.dtype,
            tuple(first.shape),
            first.stride(),
            len(layout.regions),
            self._num_blocks,
            layout.bytes_per_block,
        )
        self._transports = self._start_transports(layout)
        if self._is_producer:
            self._producer = KVProducer(
                engine_id=self._engine_id,
                tp_rank=self._tp_rank,
                transports=self._transports,
                host=self._config.host,
                side_channel_port=self._config.side_channel_port + self._tp_rank
                if self._config.side_channel_port
                else 0,
                lease_timeout_s=self._config.lease_timeout_s,
                counters=self.counters,
                on_release=self._progress.set,
            )
            self._producer.start()
        if self._is_consumer:
            self._consumer = KVConsumer(
                engine_id=self._engine_id,
                tp_rank=self._tp_rank,
                transports=self._transports,
                transfer_timeout_s=self._config.transfer_timeout_s,
                handshake_timeout_s=self._config.handshake_timeout_s,
                rendezvous_timeout_s=self._config.rendezvous_timeout_s,
                max_concurrent_transfers=self._config.max_concurrent_transfers,
                counters=self.counters,
                on_result=self._progress.set,
            )
            self._consumer.start()
        if self._store_config is not None:
            from pd.store.client import StoreClient

            assert self._store_namespace is not None
            self._store = StoreWorker(
                StoreClient(self._store_config),
                self._store_namespace,
                layout,
                self.counters,
                expected_bytes_per_block=self._store_bytes_per_block,
                on_result=self._progress.set,
            )

    def _start_transports(self, layout: KVCacheLayout) -> list[KVTransport]:
        started: list[KVTransport] = []
        for name in self._transport_names:
            transport = get_transport_class(name)(layout, self._config.host)
            try:
                transport.start(self._authorize)
            except Exception as e:
                if len(self._transport_names) == 1:
                    raise RuntimeError(f"pd: transport {name!r} failed to start: {e}") from e
                logger.warning("pd: transport %s unavailable here (%s); not offering it", name, e)
                continue
            started.append(transport)
        if not started:
            raise RuntimeError(f"pd: none of the transports {self._transport_names} started")
        logger.info("pd: transports %s", [t.name for t in started])
        return started

    def _authorize(self, request_id: str, block_ids: list[int]) -> bool:
        """Reads of this worker's blocks: only of leased ones, so never on decode only."""
        return self._producer is not None and self._producer.leases.may_read(request_id, block_ids)

    def handshake_metadata(self) -> PDHandshakeMetadata | None:
        if self._producer is None:
            return None
        return PDHandshakeMetadata(
            host=self._config.host, side_channel_port=self._producer.side_channel_port
        )

    def start_step(self, metadata: PDConnectorMetadata) -> None:
        """Apply one step's metadata: grant new leases, start new loads."""
        self._idle_step = metadata.idle_step
        if metadata.leases or metadata.failed_rendezvous:
            assert self._producer is not None
            self._producer.grant(metadata.leases, metadata.rendezvous, metadata.failed_rendezvous)
        if metadata.loads or metadata.cancelled_loads:
            assert self._consumer is not None, "loads scheduled on an instance without kv_consumer"
            for spec in metadata.loads:
                timeline.mark("load_submitted", spec.request_id)
            self._consumer.submit(metadata.loads, metadata.cancelled_loads)
        if metadata.store_loads or metadata.store_saves:
            assert self._store is not None, "store work scheduled on a worker without a store"
            self._store.submit(metadata.store_loads, metadata.store_saves)

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished_sending, finished_recving, failed_recving) since the last call."""
        if self._idle_step and self._busy():
            self._progress.wait(IDLE_STEP_WAIT_S)
        self._progress.clear()
        sending = self._producer.take_finished_sending() if self._producer else set()
        recving: set[str] = set()
        failed: set[str] = set()
        if self._consumer is not None:
            loads = self._consumer.take_results()
            recving, failed = loads.finished, loads.failed
            for request_id in recving:
                timeline.mark("load_reported", request_id)
        if self._store is not None:
            store = self._store.take_results()
            recving |= store.finished_loads
            self._load_errors |= store.failed_block_ids
            # A lease that ended while the store still copies its blocks waits for the copy.
            sending |= store.copied_saves | self._held_sending
            self._held_sending = {r for r in sending if self._store.copying(r)}
            sending -= self._held_sending
        return sending, recving, failed

    def take_load_errors(self) -> set[int]:
        """Blocks whose store load failed since the last call (vLLM recomputes them).

        vLLM asks right after ``transfer_results``, so each failed block is reported no
        later than its request's ``finished_recving``."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _busy(self) -> bool:
        return bool(
            (self._consumer is not None and self._consumer.busy)
            or (self._producer is not None and self._producer.busy)
            or (self._store is not None and self._store.busy)
        )

    def stats(self) -> PDConnectorStats | None:
        return self.counters.snapshot()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._consumer is not None:
            self._consumer.close()
        if self._producer is not None:
            self._producer.close()
        for transport in self._transports:
            transport.close()
