"""PDConnector settings, read from vLLM's ``kv_connector_extra_config``.

Every key is optional; the defaults serve two or more instances on one host with no
extra configuration. Unknown keys and bad values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from pd import envs
from pd.registry import transport_choices

LoadFailurePolicy = Literal["recompute", "fail"]  # vLLM's kv_load_failure_policy
LOAD_FAILURE_POLICIES: tuple[str, ...] = get_args(LoadFailurePolicy)


class ConfigError(ValueError):
    """A ``kv_connector_extra_config`` key is unknown or has a bad value."""


@dataclass(frozen=True)
class PDConnectorConfig:
    """Validated connector settings. See the README's "Connector configuration"."""

    transport: str = "auto"
    """Block mover: ``zmq`` (TCP anywhere), ``nixl`` or ``auto`` (best available)."""
    host: str = ""
    """Address the side channel and transport bind and advertise (default: PD_HOST)."""
    side_channel_port: int = 0
    """Side-channel port; 0 picks a free port, advertised through kv_transfer_params."""
    lease_timeout_s: float = 60.0
    """Prefill side: blocks held for a decode instance are freed after this long."""
    transfer_timeout_s: float = 30.0
    """Decode side: deadline for one request's whole load, handshake included."""
    handshake_timeout_s: float = 5.0
    """Decode side: deadline for the first contact with a prefill instance, and the
    longest silence a rendezvous wait tolerates from it (live workers say ``Pending``)."""
    max_concurrent_transfers: int = 4
    """Decode side: loads running at once (more wait their turn, within the deadline)."""
    rendezvous_timeout_s: float = 120.0
    """Decode side: how long a request sent alongside its prefill waits for the prefill
    instance to finish the prompt before decode recomputes it."""
    load_failure_policy: LoadFailurePolicy = "recompute"
    """What vLLM does when a load fails: ``recompute`` the prompt locally or ``fail``."""
    store: dict[str, Any] | None = None
    """The node's KV store (``pd.store.config.StoreConfig`` keys); None: no store. Kept
    raw here (pd.transfer sits below pd.store); the connector validates it at start."""

    def __post_init__(self) -> None:
        if self.transport not in transport_choices():
            raise ConfigError(
                f"transport: must be one of {transport_choices()}, got {self.transport!r}"
            )
        if self.load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise ConfigError(
                f"load_failure_policy: must be one of {LOAD_FAILURE_POLICIES}, "
                f"got {self.load_failure_policy!r}"
            )
        if not 0 <= self.side_channel_port <= 65535:
            raise ConfigError(f"side_channel_port: must be 0-65535, got {self.side_channel_port}")
        for name in (
            "lease_timeout_s",
            "transfer_timeout_s",
            "handshake_timeout_s",
            "rendezvous_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        if self.max_concurrent_transfers < 1:
            raise ConfigError(
                f"max_concurrent_transfers: must be >= 1, got {self.max_concurrent_transfers}"
            )
        if not self.host:
            object.__setattr__(self, "host", envs.PD_HOST())

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> PDConnectorConfig:
        """Build from ``kv_connector_extra_config``, coercing JSON values to field types."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config key(s) {unknown}; known keys: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        if "store" in extra:
            store = extra.pop("store")
            if store is not None and not isinstance(store, dict):
                raise ConfigError(f"store: expected a mapping of store keys, got {store!r}")
            values["store"] = store
        for name, value in extra.items():
            kind = type(getattr(cls, name))
            try:
                if (kind is int and isinstance(value, bool)) or (kind is not str and value is None):
                    raise TypeError
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
        return cls(**values)


def connector_default(name: str) -> Any:
    """The default of one connector setting: declared once, above, for the cluster
    schema (``pd.cluster.config.ConnectorSpec``) too."""
    return {f.name: f.default for f in fields(PDConnectorConfig)}[name]
