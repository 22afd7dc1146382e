"""The one list of the names a config chooses from: transports, routing policies, flows.

Each name is registered once, with the ``"module:attribute"`` it stands for, and the
module is imported only when the name is used: the cluster schema and the connector
config validate names without importing a transport backend or the proxy. Names are
unique; registering one twice is an error.
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry:
    """Names of one kind (``kind`` reads in messages: "transport", "flow", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.targets: dict[str, str] = {}  # name -> "module:attribute", in registration order

    def register(self, name: str, target: str) -> None:
        if name in self.targets:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attribute'")
        self.targets[name] = target

    def names(self) -> list[str]:
        return list(self.targets)

    def check(self, name: str) -> str:
        """``name`` if registered; a ValueError listing the choices otherwise."""
        if name not in self.targets:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return name

    def load(self, name: str) -> Any:
        """What ``name`` stands for, importing its module now."""
        module, _, attribute = self.targets[self.check(name)].partition(":")
        return getattr(importlib.import_module(module), attribute)


TRANSPORTS = Registry("transport")
TRANSPORTS.register("zmq", "pd.transfer.transport.zmq_tcp:ZmqTransport")
TRANSPORTS.register("nixl", "pd.transfer.transport.nixl:NixlTransport")
# Not a transport: a worker runs every transport that works here (pd.transfer.transport).
AUTO_TRANSPORT = "auto"

ROUTING_POLICIES = Registry("routing policy")
ROUTING_POLICIES.register("round_robin", "pd.proxy.routing:RoundRobin")
ROUTING_POLICIES.register("least_loaded", "pd.proxy.routing:LeastLoaded")
ROUTING_POLICIES.register("kv_aware", "pd.proxy.kv_routing:KVAware")

FLOWS = Registry("flow")
FLOWS.register("sequential", "pd.proxy.flow:SequentialFlow")
FLOWS.register("concurrent", "pd.proxy.flow:ConcurrentFlow")
FLOWS.register("first-token", "pd.proxy.first_token:FirstTokenFlow")


def transport_choices() -> list[str]:
    """What a config's ``transport`` may say."""
    return [AUTO_TRANSPORT, *TRANSPORTS.names()]
