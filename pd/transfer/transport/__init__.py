"""KV block transports behind one interface (``base.KVTransport``)."""

from pd.transfer.transport.base import (
    BlockAuthorizer,
    KVTransport,
    TransferError,
    TransferInFlight,
)
from pd.transfer.transport.registry import get_transport_class, transport_candidates

__all__ = [
    "BlockAuthorizer",
    "KVTransport",
    "TransferError",
    "TransferInFlight",
    "get_transport_class",
    "transport_candidates",
]
