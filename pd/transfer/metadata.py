"""Typed messages between pd's scheduler-side and worker-side connector halves.

``PDConnectorMetadata`` goes scheduler -> workers once per engine step;
``PDHandshakeMetadata`` goes workers -> scheduler once at start-up (vLLM collects it
with ``get_handshake_metadata`` and hands it to ``set_xfer_handshake_metadata``).
``kv_transfer_params`` (vLLM's disaggregation protocol, shared with the proxy) are
``pd.transfer.params.KVTransferParams``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from pd.transfer.params import KVTransferParams


@dataclass(frozen=True)
class PDHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Where one prefill worker (one TP rank) serves its side channel."""

    host: str
    side_channel_port: int


@dataclass(frozen=True)
class LoadSpec:
    """One decode-side load: read ``remote_block_ids`` into ``local_block_ids``.

    An empty ``local_block_ids`` (decode's prefix cache already held everything) only
    releases the prefill instance's lease. With a ``rendezvous`` the request was sent
    to decode alongside its prefill: the remote request and blocks are not known yet
    and are asked for (``resolved``) before reading.
    """

    request_id: str
    remote_request_id: str
    remote_engine_id: str
    remote_host: str
    remote_ports: tuple[int, ...]  # side-channel port per prefill TP rank
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    reports_completion: bool  # the scheduler waits for this request's load to finish
    rendezvous: str = ""

    def resolved(self, remote_request_id: str, remote_block_ids: list[int]) -> LoadSpec:
        """This load once the prefill side said where the prompt's KV is."""
        return replace(
            self,
            remote_request_id=remote_request_id,
            remote_block_ids=tuple(_tail(remote_block_ids, list(self.local_block_ids))),
            rendezvous="",
        )


@dataclass(frozen=True)
class StoreBlocks:
    """Blocks of one request to load from or save to the node's KV store (``pd.store``).

    ``block_hashes[i]`` (vLLM's prefix-cache hash) names the KV of ``block_ids[i]``.
    A save with ``reports_completion`` is reported in ``finished_sending`` once its
    blocks are copied out (vLLM holds them until then); without, a prefill lease
    holds them and reports.
    """

    request_id: str
    block_hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]
    reports_completion: bool = True


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    leases: dict[str, list[int]] = field(default_factory=dict)
    """Prefill side: requests whose blocks are now held for a decode instance."""
    rendezvous: dict[str, str] = field(default_factory=dict)
    """Prefill side: request id -> rendezvous, for leases a decode worker may wait on."""
    failed_rendezvous: list[str] = field(default_factory=list)
    """Prefill side: rendezvous whose prefill request ended without KV."""
    loads: list[LoadSpec] = field(default_factory=list)
    """Decode side: loads to start this step."""
    cancelled_loads: list[str] = field(default_factory=list)
    """Decode side: requests that ended while their load may still wait for prefill."""
    store_loads: list[StoreBlocks] = field(default_factory=list)
    """Store: blocks to fill from the node's KV store this step."""
    store_saves: list[StoreBlocks] = field(default_factory=list)
    """Store: finished requests' blocks to copy to the node's KV store."""
    idle_step: bool = False
    """This step runs no model: it only polls transfers (see ``PDWorker``)."""


def load_spec_from_params(
    request_id: str,
    params: KVTransferParams,
    local_block_ids: list[int],
    reports_completion: bool,
) -> LoadSpec:
    """Build a ``LoadSpec`` from a prefill instance's ``kv_transfer_params``.

    Raises ``ValueError`` naming the first missing or malformed key.
    """
    rendezvous = params.pd_rendezvous or ""
    if rendezvous:
        remote_request_id, remote_block_ids = "", []  # asked for before reading
    else:
        remote_request_id = _required(params, "remote_request_id")
        remote_block_ids = _tail(list(_required(params, "remote_block_ids")), local_block_ids)
    ports = params.side_channel_ports()
    if not ports:
        raise ValueError("kv_transfer_params lacks 'remote_port'")
    return LoadSpec(
        request_id=request_id,
        remote_request_id=remote_request_id,
        remote_engine_id=_required(params, "remote_engine_id"),
        remote_host=_required(params, "remote_host"),
        remote_ports=ports,
        remote_block_ids=tuple(remote_block_ids),
        local_block_ids=tuple(local_block_ids),
        reports_completion=reports_completion,
        rendezvous=rendezvous,
    )


def _required(params: KVTransferParams, key: str) -> Any:
    value = getattr(params, key)
    if value is None:
        raise ValueError(f"kv_transfer_params lacks {key!r}")
    return value


def _tail(remote_block_ids: list[int], local_block_ids: list[int]) -> list[int]:
    """Decode's own prefix cache holds the leading blocks: pull only the tail."""
    if not local_block_ids:
        return []
    if len(local_block_ids) > len(remote_block_ids):
        raise ValueError(
            f"{len(local_block_ids)} blocks to load but the prefill instance "
            f"holds {len(remote_block_ids)}"
        )
    return remote_block_ids[len(remote_block_ids) - len(local_block_ids) :]
