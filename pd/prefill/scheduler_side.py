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

When the proxy sent the decode leg at the same time, both legs carry a
``pd_rendezvous`` tag: the grant also answers the decode worker already waiting on
it, and a request that ends without KV tells that worker to stop waiting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pd.transfer.messages import PROTOCOL_VERSION
from pd.transfer.metadata import PDHandshakeMetadata
from pd.transfer.params import KVTransferParams

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class PrefillScheduler:
    def __init__(self, engine_id: str, transport: str) -> None:
        self._engine_id = engine_id
        self._transport = transport
        self._workers: dict[int, PDHandshakeMetadata] = {}
        self._leases_to_grant: dict[str, list[int]] = {}
        self._rendezvous: dict[str, str] = {}  # request id -> tag, granted with the lease
        self._failed_rendezvous: list[str] = []

    def set_workers(self, workers: dict[int, PDHandshakeMetadata]) -> None:
        """Side-channel address of every TP rank, collected once at start-up."""
        self._workers = dict(workers)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        try:
            params = KVTransferParams.from_dict(request.kv_transfer_params)
        except ValueError as e:
            logger.warning("pd: request %s: %s; its KV is not kept", request.request_id, e)
            return False, None
        if not params.do_remote_decode:
            return False, None
        tag = params.pd_rendezvous or ""
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return self._no_kv(tag)  # aborted or errored: nothing worth handing over
        if not block_ids:
            return self._no_kv(tag)
        if not self._workers:
            logger.error(
                "pd: no worker side-channel addresses (handshake metadata missing); "
                "request %s cannot hand its KV to a decode instance",
                request.request_id,
            )
            return self._no_kv(tag)

        self._leases_to_grant[request.request_id] = list(block_ids)
        if tag:
            self._rendezvous[request.request_id] = tag
        ranks = sorted(self._workers)
        answer = KVTransferParams(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_engine_id=self._engine_id,
            remote_request_id=request.request_id,
            remote_host=self._workers[ranks[0]].host,
            remote_port=self._workers[ranks[0]].side_channel_port,
            remote_ports=tuple(self._workers[r].side_channel_port for r in ranks),
            remote_block_ids=tuple(block_ids),
            remote_num_tokens=request.num_computed_tokens,
            tp_size=len(ranks),
            transport=self._transport,
            pd_protocol_version=PROTOCOL_VERSION,
        )
        return True, answer.to_dict()

    def take_grants(self) -> tuple[dict[str, list[int]], dict[str, str], list[str]]:
        """(new leases, their rendezvous tags, failed rendezvous tags) for the workers."""
        grants = (self._leases_to_grant, self._rendezvous, self._failed_rendezvous)
        self._leases_to_grant, self._rendezvous, self._failed_rendezvous = {}, {}, []
        return grants

    def _no_kv(self, tag: str) -> tuple[bool, None]:
        if tag:
            self._failed_rendezvous.append(tag)
        return False, None
