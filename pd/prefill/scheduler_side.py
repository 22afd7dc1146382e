"""Prefill role, scheduler side: hold a finished request's blocks under a lease.

Request lifecycle on a prefill instance:
1. The proxy sends the prompt with ``max_tokens: 1`` and
   ``kv_transfer_params: {"do_remote_decode": true}``.
2. vLLM computes the prompt's KV and finishes the request (length cap).
3. ``request_finished`` keeps the blocks (returns ``delay_free=True``) and returns
   ``kv_transfer_params`` telling the decode instance where the blocks are.
4. The next step's metadata grants the lease to the workers
   (``pd.prefill.kv_producer``); a worker reports the request in
   ``finished_sending`` once the decode side released it or the lease expired,
   and vLLM frees the blocks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pd.transfer.messages import PROTOCOL_VERSION
from pd.transfer.metadata import PDHandshakeMetadata

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class PrefillScheduler:
    def __init__(self, engine_id: str, transport: str) -> None:
        self._engine_id = engine_id
        self._transport = transport
        self._workers: dict[int, PDHandshakeMetadata] = {}
        self._leases_to_grant: dict[str, list[int]] = {}

    def set_workers(self, workers: dict[int, PDHandshakeMetadata]) -> None:
        """Side-channel address of every TP rank, collected once at start-up."""
        self._workers = dict(workers)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params or {}
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None  # aborted or errored: nothing worth handing over
        if not block_ids:
            return False, None
        if not self._workers:
            logger.error(
                "pd: no worker side-channel addresses (handshake metadata missing); "
                "request %s cannot hand its KV to a decode instance",
                request.request_id,
            )
            return False, None

        self._leases_to_grant[request.request_id] = list(block_ids)
        ranks = sorted(self._workers)
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self._engine_id,
            "remote_request_id": request.request_id,
            "remote_host": self._workers[ranks[0]].host,
            "remote_port": self._workers[ranks[0]].side_channel_port,
            "remote_ports": [self._workers[r].side_channel_port for r in ranks],
            "remote_block_ids": list(block_ids),
            "remote_num_tokens": request.num_computed_tokens,
            "tp_size": len(ranks),
            "transport": self._transport,
            "pd_protocol_version": PROTOCOL_VERSION,
        }

    def take_leases_to_grant(self) -> dict[str, list[int]]:
        leases, self._leases_to_grant = self._leases_to_grant, {}
        return leases
