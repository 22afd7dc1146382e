"""``kv_transfer_params``: the one typed definition of the keys pd reads and writes.

The keys are vLLM's disaggregation protocol (``do_remote_decode``,
``do_remote_prefill``, ``remote_engine_id``, ``remote_host``, ``remote_port``,
``remote_block_ids``, ...) plus pd's own (``remote_ports``, ``remote_num_tokens``,
``pd_rendezvous``, ...). The proxy writes them on each leg, the prefill scheduler
answers with them, the decode scheduler reads them. A key that is absent stays absent
(``None``; a JSON null reads as absent), and keys pd does not know are kept
(``extra``), so a dict read and written back is the same dict: what goes over the wire
is exactly what went before.

No vLLM import here: the proxy uses this too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# The protocol version whose prefill side answers a rendezvous (``pd_rendezvous``).
RENDEZVOUS_PROTOCOL = 2


@dataclass(frozen=True)
class KVTransferParams:
    do_remote_prefill: bool | None = None
    """-> decode: the prompt's KV comes from the prefill instance named below."""
    do_remote_decode: bool | None = None
    """Proxy -> prefill: keep the prompt's KV for a decode instance."""
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    """Side-channel port of the prefill instance's TP rank 0."""
    remote_ports: tuple[int, ...] | None = None
    """Side-channel port of each of the prefill instance's TP ranks."""
    remote_block_ids: tuple[int, ...] | None = None
    remote_num_tokens: int | None = None
    """Prompt tokens the prefill instance computed KV for (decode computes the rest)."""
    tp_size: int | None = None
    transport: str | None = None
    """The prefill instance's configured transport (informational)."""
    pd_protocol_version: int | None = None
    pd_rendezvous: str | None = None
    """Both legs sent at once: the tag that pairs decode's load with prefill's KV."""
    prompt_token_ids: tuple[int, ...] | None = None
    """First-token flow, chat: the prompt to decode, instead of rendering the messages."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys pd does not read, passed on unchanged."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KVTransferParams:
        """Read ``kv_transfer_params``; a known key of the wrong type is a ValueError
        naming it. ``None`` (no params) reads as no keys."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"kv_transfer_params: expected an object, got {data!r}")
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            kind = _KINDS.get(key)
            if kind is None:
                extra[key] = value
            elif value is not None:
                values[key] = _checked(key, value, kind)
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys that are set, then the unknown ones as read."""
        out: dict[str, Any] = {}
        for name in _KINDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    def kv_address(self) -> KVTransferParams:
        """Only where the prefill instance's KV can be reached: what a decode leg sent
        alongside its prefill needs before the prefill answered."""
        return KVTransferParams(
            remote_engine_id=self.remote_engine_id,
            remote_host=self.remote_host,
            remote_port=self.remote_port,
            remote_ports=self.remote_ports,
            tp_size=self.tp_size,
        )

    def answers_rendezvous(self) -> bool:
        """The prefill instance that wrote these speaks the rendezvous protocol."""
        return (self.pd_protocol_version or 0) >= RENDEZVOUS_PROTOCOL

    def side_channel_ports(self) -> tuple[int, ...]:
        """The prefill side channel of each TP rank (older answers name only rank 0's)."""
        if self.remote_ports:
            return self.remote_ports
        return (self.remote_port,) if self.remote_port is not None else ()

    def replace(self, **changes: Any) -> KVTransferParams:
        return replace(self, **changes)


# Each key's JSON type ("ids": a list of integers), in the order ``to_dict`` writes them.
_KINDS: dict[str, type | str] = {
    "do_remote_prefill": bool,
    "do_remote_decode": bool,
    "remote_engine_id": str,
    "remote_request_id": str,
    "remote_host": str,
    "remote_port": int,
    "remote_ports": "ids",
    "remote_block_ids": "ids",
    "remote_num_tokens": int,
    "tp_size": int,
    "transport": str,
    "pd_protocol_version": int,
    "pd_rendezvous": str,
    "prompt_token_ids": "ids",
}
assert set(_KINDS) == {f.name for f in fields(KVTransferParams)} - {"extra"}


def _checked(key: str, value: Any, kind: type | str) -> Any:
    if kind == "ids":
        if isinstance(value, list | tuple) and all(_is_int(v) for v in value):
            return tuple(value)
        raise ValueError(f"kv_transfer_params.{key}: expected a list of integers, got {value!r}")
    if kind is int:
        if _is_int(value):
            return value
        raise ValueError(f"kv_transfer_params.{key}: expected an integer, got {value!r}")
    assert isinstance(kind, type)
    if isinstance(value, kind):
        return value
    raise ValueError(f"kv_transfer_params.{key}: expected {kind.__name__}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
