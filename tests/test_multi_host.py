"""A pd cluster across hosts: network namespaces as hosts (scripts/test_hosts.py), Ray
across them, prefill on one host and decode on another.

The unit tests (placement config, fit, the instance's network settings) need nothing.
The engine tests need root (``ip netns``; CI runs as root): host 0 runs the Ray head,
pd-serve and the decode instance, host 1 a Ray worker node and the prefill instance,
so every KV transfer and every proxy call to prefill crosses host 1's veth.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psutil
import pytest

from pd.cluster.config import ClusterConfig, ConfigError
from pd.cluster.launcher import actor_placement_options
from pd.cluster.network import instance_network_env, interface_of
from pd.cluster.plan import make_plan
from pd.cluster.resources import Node, fit_problems
from pd.serve_process import PdServeProcess, deep_merge, local_config
from pd.vllm_server import parse_prometheus
from scripts.scenarios.bounds import ENGINE_SLACK_S, REJOIN_S
from scripts.scenarios.faults import FAULT_OVERRIDES
from scripts.test_hosts import HOST_LABEL, Host, NetnsHosts, ray_env, smoke
from tests.harness.openai_api import GREEDY, PROMPT, client_of
from tests.harness.waiting import wait_for

# --- placement and network settings (no engines) -----------------------------------------

JOINED = {"model": {"preset": "tiny"}, "ray": {"address": "10.9.9.9:6379"}}


def _config(extra: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(deep_merge(JOINED, extra))


def test_placement_reaches_the_actor_options_and_the_plan():
    config = _config(
        {
            "prefill": {"placement": {"labels": {"pd-host": "a"}, "resources": {"fast": 0.5}}},
            "decode": {"placement": {"labels": {"pd-host": "b"}}},
        }
    )
    plan = make_plan(config, available_cores=[0, 1])
    prefill, decode = plan.by_role("prefill")[0], plan.by_role("decode")[0]
    assert actor_placement_options(prefill) == {
        "resources": {"fast": 0.5},
        "label_selector": {"pd-host": "a"},
    }
    assert actor_placement_options(decode) == {"label_selector": {"pd-host": "b"}}
    assert "fast=0.5 label:pd-host=a" in plan.describe()
    unplaced = make_plan(_config({}), available_cores=[0, 1]).instances[0]
    assert actor_placement_options(unplaced) == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prefill": {"placement": {"resources": {"CPU": 1}}}}, "set by resources.cpus/gpus"),
        ({"decode": {"placement": {"resources": {"fast": 0}}}}, "greater than 0"),
        ({"decode": {"placement": {"labels": {" ": "x"}}}}, "a label needs a name"),
        ({"decode": {"placement": {"nodes": ["a"]}}}, "Extra inputs"),
        (
            {"ray": {"address": None}, "prefill": {"placement": {"labels": {"a": "b"}}}},
            "prefill.placement: a local cluster is one node",
        ),
    ],
)
def test_bad_placement_is_named(extra, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        _config(extra)


def test_fit_keeps_an_instance_to_the_nodes_its_placement_names():
    config = _config(
        {
            "prefill": {"placement": {"labels": {"pd-host": "host-1"}}},
            "decode": {"placement": {"resources": {"pd-host-0": 1}}},
        }
    )
    plan = make_plan(config, available_cores=[0, 1])
    head = Node("10.0.0.1", {"CPU": 2.0, "pd-host-0": 1.0}, labels={"pd-host": "host-0"})
    worker = Node("10.0.0.2", {"CPU": 2.0, "pd-host-1": 1.0}, labels={"pd-host": "host-1"})
    assert fit_problems(plan.instances, [head, worker]) == []
    assert head.holders == ["pd-decode-0"] and worker.holders == ["pd-prefill-0"]
    assert fit_problems(plan.instances, [head]) == [
        "pd-prefill-0 needs a node with label pd-host=host-1; none of the cluster's 1 nodes "
        "has it (prefill.placement)"
    ]
    # Its resource taken by another instance: it waits for that node, not any node.
    config = _config({"decode": {"instances": 2, "placement": {"resources": {"pd-host-0": 1}}}})
    (problem,) = fit_problems(make_plan(config, [0, 1]).instances, [head, worker])
    assert problem.startswith("pd-decode-1 needs CPU 1, pd-host-0 1;")


def test_an_instance_binds_and_advertises_its_nodes_address_and_interface(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.250") is None  # nobody's
    env = instance_network_env("127.0.0.1", {}, gpus=0)
    assert env == {"PD_HOST": "127.0.0.1", "VLLM_HOST_IP": "127.0.0.1", "UCX_NET_DEVICES": "lo"}
    # The role's own choice, and GPU instances (UCX picks RDMA and NVLink there), stay.
    assert "UCX_NET_DEVICES" not in instance_network_env("127.0.0.1", {"UCX_NET_DEVICES": "x"}, 0)
    assert "UCX_NET_DEVICES" not in instance_network_env("127.0.0.1", {}, gpus=1)


# --- across hosts (engines, root) --------------------------------------------------------

UCX_TCP = {"UCX_TLS": "tcp"}
LONG_PROMPT = "KV crosses the veth between two network namespaces. " * 30  # ~1.5k tokens


@dataclass(frozen=True)
class VllmOnHost:
    host: Host
    pid: int
    bound: str  # --host
    url: str
    role: str

    def environ(self) -> dict[str, str]:
        return psutil.Process(self.pid).environ()

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(httpx.get(f"{self.url}/metrics", timeout=10).text)


def vllm_servers(host: Host) -> list[VllmOnHost]:
    """The ``vllm serve`` processes running inside ``host``."""
    found = []
    for pid in host.pids():
        with contextlib.suppress(psutil.Error, ValueError):
            cmd = psutil.Process(pid).cmdline()
            if "serve" not in cmd or "--kv-transfer-config" not in cmd:
                continue
            bound, port = cmd[cmd.index("--host") + 1], cmd[cmd.index("--port") + 1]
            kv_config = cmd[cmd.index("--kv-transfer-config") + 1]
            role = "prefill" if '"kv_producer"' in kv_config else "decode"
            found.append(VllmOnHost(host, pid, bound, f"http://{bound}:{port}", role))
    return found


def instance_processes(host: Host) -> list[str]:
    """What of pd's instances still runs inside ``host`` (vLLM, its engine, the guardian)."""
    left = []
    for pid in host.pids():
        with contextlib.suppress(psutil.Error):
            line = " ".join(psutil.Process(pid).cmdline())
            if "vllm" in line or "pd.guardian" in line or "VLLM::" in line:
                left.append(f"{pid}: {line[:120]}")
    return left


@dataclass
class MultiHost:
    hosts: NetnsHosts
    a: Host  # head, pd-serve, decode
    b: Host  # worker node, prefill
    config: dict
    serve: PdServeProcess

    def only(self, host: Host) -> VllmOnHost:
        (server,) = vllm_servers(host)
        return server

    def health(self) -> dict:
        return httpx.get(f"{self.serve.url}/health", timeout=5).json()

    def start_serve(self, overrides: dict | None = None) -> None:
        """pd-serve in host A on the hosts' Ray cluster (stopping the one running)."""
        if getattr(self, "serve", None) is not None:
            self.serve.stop()
            assert wait_for(lambda: not vllm_servers(self.a) and not vllm_servers(self.b), 120)
        config = deep_merge(self.config, overrides or {})
        self.serve = PdServeProcess(
            config, command_prefix=self.a.exec_prefix(), proxy_host=self.a.address, env=ray_env()
        )
        self.serve.start().wait_ready(timeout_s=600)


@pytest.fixture(scope="module")
def multi_host() -> Iterator[MultiHost]:
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests need root (ip netns); CI runs them as root")
    hosts = NetnsHosts()
    hosts.down()  # what a crashed run left
    address = hosts.ray_up(2)
    a, b = hosts.host(0), hosts.host(1)
    config = local_config(
        deep_merge(
            FAULT_OVERRIDES,
            {
                "ray": {"address": address},
                # NIXL by name: `auto` picks ZMQ for a KV cache in host memory.
                "transport": "nixl",
                # Namespaces share the machine's memory, and UCX would move the KV
                # through it (cma, shm: measured, nothing crossed the veth); over tcp, as
                # between two machines.
                "prefill": {"placement": {"labels": {HOST_LABEL: b.label}}, "env": UCX_TCP},
                "decode": {"placement": {"labels": {HOST_LABEL: a.label}}, "env": UCX_TCP},
            },
        )
    )
    m = MultiHost(hosts, a, b, config, serve=None)  # type: ignore[arg-type]
    try:
        m.start_serve()
        yield m
    finally:
        with contextlib.suppress(Exception):
            b.set_link(True)
            b.unshape()
        if m.serve is not None:
            m.serve.stop()
        hosts.down()


def _complete(serve: PdServeProcess, prompt: str, max_tokens: int = 16) -> str:
    body = {**GREEDY, "max_tokens": max_tokens}
    return (
        client_of(serve).completions.create(model="pd-tiny", prompt=prompt, **body).choices[0].text
    )


def _reference(reference, prompt: str, max_tokens: int = 16) -> str:
    client, model = reference
    body = {**GREEDY, "max_tokens": max_tokens}
    return client.completions.create(model=model, prompt=prompt, **body).choices[0].text


@pytest.mark.engines
def test_hosts_script_up_and_down():
    """up 2 (twice: idempotent), TCP between the hosts and from the machine, no route out,
    down leaves nothing (scripts/test_hosts.py --smoke). Marked engines: it shares the
    namespaces with the tests below, so it runs under the engine lock, never beside them."""
    if os.geteuid() != 0:
        pytest.fail("needs root (ip netns); CI runs as root")
    smoke(NetnsHosts())


@pytest.mark.engines
def test_prefill_on_one_host_decode_on_another_equals_one_instance(multi_host, reference):
    _kv_crosses_hosts(multi_host, reference, "nixl")


def _kv_crosses_hosts(m: MultiHost, reference, transport: str) -> None:
    """Greedy answers equal one instance's, every KV load over ``transport`` and its bytes
    on host B's veth."""
    prefill, decode = m.only(m.b), m.only(m.a)
    assert (prefill.role, prefill.bound) == ("prefill", m.b.address)
    assert (decode.role, decode.bound) == ("decode", m.a.address)
    # UCX on each node's own interface; the side channel and ZMQ on its address.
    assert prefill.environ()["UCX_NET_DEVICES"] == m.b.interface
    assert decode.environ()["UCX_NET_DEVICES"] == m.a.interface
    assert prefill.environ()["PD_HOST"] == m.b.address

    before, sent_before = decode.metrics(), m.b.bridge_bytes()[0]
    prompts = [PROMPT, LONG_PROMPT, "Tell me about two hosts. " * 20]
    for prompt in prompts:
        assert _complete(m.serve, prompt) == _reference(reference, prompt)
    after, sent_after = decode.metrics(), m.b.bridge_bytes()[0]

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("vllm:pd_kv_transfers_total") == len(prompts)
    for name in ("nixl", "zmq"):
        assert grew(f"vllm:pd_kv_transfers_via_{name}_total") == (
            len(prompts) if name == transport else 0
        )
    assert grew("vllm:pd_kv_transfer_failures_total") == 0
    received = grew("vllm:pd_kv_bytes_received_total")
    assert received > 0
    # Everything host B sent went through its veth: the KV was among it.
    assert sent_after - sent_before >= received, (sent_after - sent_before, received)
    proxy = parse_prometheus(httpx.get(f"{m.serve.url}/metrics", timeout=10).text)
    assert proxy['pd_instance_healthy{instance="pd-prefill-0",role="prefill"}'] == 1


@pytest.mark.engines
def test_link_cut_mid_transfer_recomputes_and_the_cluster_serves_again(multi_host, reference):
    m = multi_host
    decode = m.only(m.a)
    expected = _reference(reference, LONG_PROMPT)
    before = decode.metrics()
    m.b.shape("8mbit")  # the prompt's KV now takes seconds to cross
    bound = float(m.serve.request_s) + ENGINE_SLACK_S
    try:
        with ThreadPoolExecutor(1) as pool:
            sent = m.b.bridge_bytes()[0]
            started = time.monotonic()
            answer = pool.submit(_complete, m.serve, LONG_PROMPT)
            # KV is crossing once host B sends far more than its HTTP answers.
            assert wait_for(lambda: m.b.bridge_bytes()[0] - sent > 256 * 1024, 60, 0.02)
            m.b.set_link(False)
            try:
                text = answer.result(timeout=bound)
            except Exception as e:  # what decode did with the load says why
                raise AssertionError(m.serve.instance_log("pd-decode-0")) from e
        elapsed = time.monotonic() - started
    finally:
        m.b.set_link(True)
        m.b.unshape()
    after = decode.metrics()
    # Decode gave the load up within its deadline and computed the prompt itself.
    assert text == expected
    assert elapsed < bound
    assert (
        after["vllm:pd_kv_transfer_failures_total"] > before["vllm:pd_kv_transfer_failures_total"]
    )

    # The read over the cut link ended (UCX's TCP keepalive, set by pd) before decode
    # reported the load failed: nothing of it was left to land once the link returned.
    assert after.get("vllm:pd_kv_transfers_quarantined_total", 0) == 0

    # The link is back: prefill rejoins, the KV crosses again, into blocks no late read
    # writes (before the fix, 1 run in 3 answered wrong here).
    m.serve.wait_ready(timeout_s=REJOIN_S)
    answer = _reference(reference, PROMPT)

    def crossed_again() -> bool:
        # /health can still say "ok" from before the cut's failed checks take prefill
        # out: until it is back, requests are served on decode alone (equal answers too).
        loads = decode.metrics()["vllm:pd_kv_transfers_total"]
        assert _complete(m.serve, PROMPT) == answer
        return decode.metrics()["vllm:pd_kv_transfers_total"] > loads

    assert wait_for(crossed_again, REJOIN_S, 1)
    # The recomputed prompt again (decode's prefix cache holds it now, no load).
    assert _complete(m.serve, LONG_PROMPT) == expected


@pytest.mark.engines
def test_worker_raylet_killed_its_instance_leaves_and_comes_back(multi_host, reference):
    m = multi_host
    raylet = m.hosts.raylet_pid(m.b)
    assert raylet is not None
    os.kill(raylet, signal.SIGKILL)
    # Its prefill instance leaves the rotation; decode serves alone ("degraded").
    assert wait_for(lambda: m.health() == {"status": "degraded", "prefill": 0, "decode": 1}, 120)
    assert _complete(m.serve, PROMPT) == _reference(reference, PROMPT)
    # Its processes end with the node's (the guardian's promise), none left behind.
    assert wait_for(lambda: not instance_processes(m.b), 120), instance_processes(m.b)

    # The node comes back (a fresh Ray node on host B): the instance is placed there again.
    m.hosts.stop_processes(m.b)  # what Ray left of the old node (agents)
    m.hosts.ray_up(2)
    m.serve.wait_ready(timeout_s=REJOIN_S)
    decode = m.only(m.a)
    before = decode.metrics()
    assert _complete(m.serve, LONG_PROMPT) == _reference(reference, LONG_PROMPT)
    after = decode.metrics()
    assert after["vllm:pd_kv_transfers_total"] == before["vllm:pd_kv_transfers_total"] + 1
    assert m.only(m.b).bound == m.b.address


@pytest.mark.engines
def test_kv_crosses_hosts_over_zmq_too(multi_host, reference):
    """The same cluster with ``transport: zmq`` (pd-serve restarted on the hosts' Ray
    cluster): the KV crosses the veth over ZMQ+TCP from host B's address."""
    m = multi_host
    m.start_serve({"transport": "zmq"})
    _kv_crosses_hosts(m, reference, "zmq")
