"""PDConnectorConfig validation and the transport registry."""

from __future__ import annotations

from typing import Any

import pytest

from pd.transfer.config import ConfigError, PDConnectorConfig
from pd.transfer.transport import registry


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PD_HOST", raising=False)
    for extra in (None, {}):
        config = PDConnectorConfig.from_extra_config(extra)
        assert config == PDConnectorConfig(host="127.0.0.1")
        assert config.transport == "auto"
        assert config.side_channel_port == 0
        assert config.lease_timeout_s == 60.0
        assert config.transfer_timeout_s == 30.0
        assert config.handshake_timeout_s == 5.0
        assert config.max_concurrent_transfers == 4
        assert config.load_failure_policy == "recompute"


def test_host_defaults_to_pd_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_HOST", "10.1.2.3")
    assert PDConnectorConfig.from_extra_config({}).host == "10.1.2.3"
    assert PDConnectorConfig.from_extra_config({"host": "0.0.0.0"}).host == "0.0.0.0"


def test_coercion() -> None:
    config = PDConnectorConfig.from_extra_config(
        {
            "side_channel_port": "5555",
            "lease_timeout_s": 2,
            "transfer_timeout_s": "1.5",
            "handshake_timeout_s": "3",
            "max_concurrent_transfers": "8",
            "transport": "zmq",
            "load_failure_policy": "fail",
        }
    )
    assert config.side_channel_port == 5555
    assert isinstance(config.lease_timeout_s, float) and config.lease_timeout_s == 2.0
    assert config.transfer_timeout_s == 1.5
    assert config.handshake_timeout_s == 3.0
    assert config.max_concurrent_transfers == 8
    assert config.transport == "zmq"
    assert config.load_failure_policy == "fail"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"lease_timout_s": 5}, "lease_timout_s"),
        ({"transport": "rdma"}, "transport"),
        ({"lease_timeout_s": -1}, "lease_timeout_s"),
        ({"transfer_timeout_s": 0}, "transfer_timeout_s"),
        ({"handshake_timeout_s": "-0.5"}, "handshake_timeout_s"),
        ({"side_channel_port": 70000}, "side_channel_port"),
        ({"side_channel_port": -1}, "side_channel_port"),
        ({"side_channel_port": "http"}, "side_channel_port"),
        ({"max_concurrent_transfers": 0}, "max_concurrent_transfers"),
        ({"max_concurrent_transfers": [4]}, "max_concurrent_transfers"),
        ({"lease_timeout_s": [1.0]}, "lease_timeout_s"),
        ({"max_concurrent_transfers": True}, "max_concurrent_transfers"),
        ({"side_channel_port": None}, "side_channel_port"),
        ({"load_failure_policy": "retry"}, "load_failure_policy"),
    ],
)
def test_invalid_values_name_the_key(extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PDConnectorConfig.from_extra_config(extra)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_transport_candidates() -> None:
    # NIXL is part of pd's install, so `auto` offers it first on a GPU, then ZMQ; with
    # the KV cache in host memory, ZMQ alone (NIXL's UCX over TCP livelocks there).
    assert registry.transport_candidates("auto", kv_on_gpu=True) == ["nixl", "zmq"]
    assert registry.transport_candidates("auto", kv_on_gpu=False) == ["zmq"]
    for kv_on_gpu in (True, False):
        assert registry.transport_candidates("zmq", kv_on_gpu) == ["zmq"]
        assert registry.transport_candidates("nixl", kv_on_gpu) == ["nixl"]
    with pytest.raises(ValueError, match="unknown transport 'rdma'"):
        registry.transport_candidates("rdma", kv_on_gpu=False)


def test_nixl_requested_where_it_does_not_import_fails_fast(monkeypatch) -> None:
    import pd.transfer.transport.nixl as nixl_module

    monkeypatch.setattr(nixl_module, "nixl_available", lambda: False)
    assert registry.transport_candidates("auto", kv_on_gpu=True) == ["zmq"]
    with pytest.raises(ValueError, match="NIXL does not import here"):
        registry.transport_candidates("nixl", kv_on_gpu=True)


def test_register_transport_rejects_duplicates() -> None:
    name = "pd-test-fake-transport"
    assert name not in registry.available_transports()
    try:
        registry.register_transport(name, "pd.transfer.transport.zmq_tcp:ZmqTransport")
        assert name in registry.available_transports()
        with pytest.raises(ValueError, match="already registered"):
            registry.register_transport(name, "elsewhere:Other")
        assert registry._TRANSPORTS[name] == "pd.transfer.transport.zmq_tcp:ZmqTransport"
    finally:
        registry._TRANSPORTS.pop(name, None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_transport("zmq", "elsewhere:Other")
