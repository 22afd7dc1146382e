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


def resolve_transport(requested: str) -> str:
    """Map a configured transport (``auto`` included) to the one this worker runs.

    ``auto`` picks the best transport that works here. NIXL is not part of pd yet,
    so today ``auto`` means ``zmq`` and ``nixl`` is refused with a clear message.
    """
    if requested == "auto":
        return "zmq"
    if requested not in _TRANSPORTS:
        raise ValueError(
            f"transport {requested!r} is not available in this pd version; "
            f"available: {available_transports()} or 'auto'"
        )
    return requested


register_transport("zmq", "pd.transfer.transport.zmq_tcp:ZmqTransport")
