"""Transport names -> classes, from pd's one registry (``pd.registry.TRANSPORTS``).

Backends are imported only when a worker starts them, so an unused one costs nothing.
"""

from __future__ import annotations

from pd.registry import AUTO_TRANSPORT, TRANSPORTS
from pd.transfer.transport.base import KVTransport

# The registry's own table, for code that lists or inspects registrations.
_TRANSPORTS = TRANSPORTS.targets


def register_transport(name: str, target: str) -> None:
    """Register ``"module.path:ClassName"`` under ``name``; names are unique."""
    TRANSPORTS.register(name, target)


def available_transports() -> list[str]:
    return sorted(TRANSPORTS.names())


def get_transport_class(name: str) -> type[KVTransport]:
    transport: type[KVTransport] = TRANSPORTS.load(name)
    return transport


# Under ``auto``, the order in which transports are offered and tried with each peer,
# for a KV cache in GPU memory. A KV cache in host memory gets ZMQ alone: NIXL 1.5's
# UCX over TCP livelocks there now and then (measured on this 2-core machine, see
# docs/structure.md "Transports"): the prefill worker's UCX progress thread spins a
# whole core for 9-80 s while the READ it should serve stays in flight.
AUTO_PREFERENCE = ("nixl", "zmq")
AUTO_HOST_MEMORY = ("zmq",)


def transport_candidates(requested: str, kv_on_gpu: bool) -> list[str]:
    """The transports a worker runs for a configured ``transport``, best first.

    ``auto``: on a GPU, NIXL when it imports here, then ZMQ (each peer gets the first
    one that works with it); with the KV cache in host memory, ZMQ. ``nixl`` where NIXL
    does not import fails fast with the reason.
    """
    from pd.transfer.transport.nixl import nixl_available

    if requested == AUTO_TRANSPORT:
        if not kv_on_gpu:
            return list(AUTO_HOST_MEMORY)
        return [n for n in AUTO_PREFERENCE if n != "nixl" or nixl_available()]
    TRANSPORTS.check(requested)
    if requested == "nixl" and not nixl_available():
        raise ValueError(
            "transport 'nixl' was requested but NIXL does not import here; install it "
            "(scripts/setup.sh does) or use transport 'zmq' or 'auto'"
        )
    return [requested]
