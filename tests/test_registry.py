"""The one registry of transport, routing and flow names (unit), and the configs that
validate against it."""

from __future__ import annotations

import dataclasses

import pytest

from pd import registry
from pd.cluster.config import ClusterConfig, ConnectorSpec, ProxySpec
from pd.proxy.flow import Flow
from pd.proxy.routing import RoutingPolicy
from pd.transfer.config import ConfigError, PDConnectorConfig
from pd.transfer.transport.base import KVTransport


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (registry.TRANSPORTS, KVTransport),
        (registry.ROUTING_POLICIES, RoutingPolicy),
        (registry.FLOWS, Flow),
    ],
)
def test_every_name_loads_what_it_stands_for(names: registry.Registry, kind: type) -> None:
    assert names.names()
    for name in names.names():
        target = names.load(name)
        assert issubclass(target, kind)
        if kind is not Flow:
            assert target.name == name  # the class knows its own name


def test_names_are_unique_and_targets_well_formed() -> None:
    names = registry.Registry("thing")
    names.register("a", "os.path:join")
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        names.register("a", "os.path:split")
    with pytest.raises(ValueError, match="module:attribute"):
        names.register("b", "os.path.join")
    assert names.load("a") is __import__("os").path.join
    with pytest.raises(ValueError, match=r"unknown thing 'c'; choose one of \['a'\]"):
        names.load("c")


def test_registering_imports_nothing() -> None:
    names = registry.Registry("thing")
    names.register("missing", "pd.no_such_module:Nothing")  # only imported when used
    with pytest.raises(ModuleNotFoundError):
        names.load("missing")


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("routing", "random", registry.ROUTING_POLICIES.names()),
        ("flow", "parallel", registry.FLOWS.names()),
    ],
)
def test_cluster_config_takes_the_registered_names(key: str, value: str, names: list) -> None:
    for name in names:
        assert getattr(ProxySpec(**{key: name}), key) == name
    with pytest.raises(ValueError, match=f"unknown .* '{value}'") as refused:
        ProxySpec(**{key: value})
    assert f"choose one of {names!r}" in str(refused.value)


def test_transport_names_in_both_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    choices = registry.transport_choices()
    assert choices == ["auto", "zmq", "nixl"]
    for name in choices:
        assert ClusterConfig(model={"preset": "tiny"}, transport=name).transport == name
        assert PDConnectorConfig(transport=name).transport == name
    with pytest.raises(ValueError, match="unknown transport 'rdma'"):
        ClusterConfig(model={"preset": "tiny"}, transport="rdma")
    with pytest.raises(ConfigError, match="transport"):
        PDConnectorConfig(transport="rdma")
    # A name registered once is a name both configs accept.
    monkeypatch.setitem(registry.TRANSPORTS.targets, "pd-test", "pd.transfer.transport.zmq_tcp:X")
    assert ClusterConfig(model={"preset": "tiny"}, transport="pd-test").transport == "pd-test"
    assert PDConnectorConfig(transport="pd-test").transport == "pd-test"


def test_connector_defaults_are_the_connectors_own() -> None:
    connector = {f.name: f.default for f in dataclasses.fields(PDConnectorConfig)}
    spec = ConnectorSpec()
    for name in ConnectorSpec.model_fields:
        assert getattr(spec, name) == connector[name], name
    assert ClusterConfig(model={"preset": "tiny"}).transport == connector["transport"]
    # What the cluster passes as kv_connector_extra_config is a valid connector config.
    extra = {"transport": "zmq", **spec.model_dump()}
    assert (
        PDConnectorConfig.from_extra_config(extra).lease_timeout_s == connector["lease_timeout_s"]
    )
