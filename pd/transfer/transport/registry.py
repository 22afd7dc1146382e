"""Transport names -> classes, imported lazily so an unused backend costs nothing."""

from __future__ import annotations

import importlib

from pd.transfer.transport.base import KVTransport

_TRANSPORTS: dict[str, str] = {}


def register_transport(name: str, target: str) -> None:
    """Register ``"module.path:ClassName"`` under ``name``; names are unique."""
    if name in _TRANSPORTS:
        raise ValueError(f"transport {name!r} is already registered")
    _TRANSPORTS[name] = target


def available_transports() -> list[str]:
    return sorted(_TRANSPORTS)


def get_transport_class(name: str) -> type[KVTransport]:
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; available: {available_transports()}")
    module_name, class_name = _TRANSPORTS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


# Under ``auto``, the order in which transports are offered and tried with each peer.
AUTO_PREFERENCE = ("nixl", "zmq")


def transport_candidates(requested: str) -> list[str]:
    """The transports a worker runs for a configured ``transport``, best first.

    ``auto``: NIXL when it imports here, then ZMQ (each peer gets the first one that
    works with it). ``nixl`` where NIXL does not import fails fast with the reason.
    """
    from pd.transfer.transport.nixl import nixl_available

    if requested == "auto":
        return [n for n in AUTO_PREFERENCE if n != "nixl" or nixl_available()]
    if requested not in _TRANSPORTS:
        raise ValueError(f"unknown transport {requested!r}; available: {available_transports()}")
    if requested == "nixl" and not nixl_available():
        raise ValueError(
            "transport 'nixl' was requested but NIXL does not import here; install it "
            "(scripts/setup.sh does) or use transport 'zmq' or 'auto'"
        )
    return [requested]


register_transport("zmq", "pd.transfer.transport.zmq_tcp:ZmqTransport")
register_transport("nixl", "pd.transfer.transport.nixl:NixlTransport")
