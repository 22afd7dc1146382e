"""The transport interface: how block bytes move from a prefill worker to a decode worker.

A transport only registers memory and moves blocks. Handshakes, leases, releases and
retries around failures live above it (``pd.transfer.side_channel``,
``pd.prefill.kv_producer``, ``pd.decode.kv_consumer``) and are written once for all
transports.

Lifecycle, per worker: ``__init__`` (no threads, no sockets) -> ``start`` once after
vLLM registered its KV cache -> ``read_blocks`` from any number of threads ->
``close`` once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from pd.transfer.layout import KVCacheLayout

# Asked by a serving transport before it hands out a request's blocks (see
# ``LeaseTable.may_read``): False when they are not, or no longer, held for it.
BlockAuthorizer = Callable[[str, list[int]], bool]

TransportMetadata = dict[str, str | int]


class TransferError(RuntimeError):
    """A block read failed or missed its deadline. The caller recomputes instead."""


# Waits until ``time.monotonic()`` reaches its argument for a read to end; True once it
# has ended (done or failed: nothing of it can land any more).
Settle = Callable[[float], bool]


class TransferInFlight(TransferError):
    """A read given up at its deadline that has not ended: its bytes may still land.

    The destination blocks must not be handed back (recomputed into, given to another
    request) until ``settle`` returns True. A one-sided read (NIXL) cannot be recalled:
    UCX completes it once a stalled peer or a cut link comes back, whatever the caller
    did with the handle meanwhile (measured: releasing it, or removing the peer's agent
    first, does not stop it).
    """

    def __init__(self, message: str, settle: Settle) -> None:
        super().__init__(message)
        self.settle = settle


class KVTransport(ABC):
    name: ClassVar[str]

    def __init__(self, layout: KVCacheLayout, host: str) -> None:
        self.layout = layout
        self.host = host

    @abstractmethod
    def start(self, authorize: BlockAuthorizer) -> None:
        """Start serving this worker's blocks. Called once, on the engine thread.

        ``authorize`` guards every read a peer asks this worker to serve.
        """

    @abstractmethod
    def metadata(self) -> TransportMetadata:
        """What a peer needs to read from this worker; sent in the handshake."""

    def connect(self, peer: TransportMetadata) -> None:
        """Prepare to read from a peer (once per peer, from any thread).

        Raises ``TransferError`` when this transport cannot reach the peer; under
        ``transport: auto`` the next transport is tried instead.
        """
        return

    def read_blocks(
        self,
        peer: TransportMetadata,
        request_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        deadline: float,
    ) -> int:
        """Copy the peer's ``src_block_ids`` of every region into our ``dst_block_ids``.

        Called from decode-side transfer threads, concurrently for different requests.
        Blocks until done or until ``deadline`` (``time.monotonic()`` seconds) and
        returns the bytes moved. Raises ``TransferError`` on any failure; the
        destination blocks' contents are then undefined. ``TransferInFlight`` when
        the read passed its deadline but may still write into them.
        """
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(
                f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destinations"
            )
        if not src_block_ids:
            return 0
        return self._read_blocks(peer, request_id, src_block_ids, dst_block_ids, deadline)

    @abstractmethod
    def _read_blocks(
        self,
        peer: TransportMetadata,
        request_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        deadline: float,
    ) -> int:
        """``read_blocks`` after its arguments were checked: equal lengths, not empty."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving and release sockets and registrations. Idempotent."""
