"""The network settings of an instance on a node of a joined cluster.

Each instance binds and advertises its node's address (Ray's node IP, ``ray start
--node-ip-address``): vLLM's server, the transfer side channel and the ZMQ transport
(``PD_HOST``), and vLLM's own idea of its address (``VLLM_HOST_IP``). NIXL's UCX picks
its interfaces itself unless told (``UCX_NET_DEVICES``); on a CPU instance pd names
the interface that holds the node's address, so KV moves on the network Ray uses.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

import psutil  # a dependency of vLLM


def interface_of(address: str) -> str | None:
    """The name of the interface that holds ``address`` on this machine, or None."""
    wanted = ipaddress.ip_address(address)
    for name, addresses in psutil.net_if_addrs().items():
        for each in addresses:
            try:
                if ipaddress.ip_address(each.address.split("%")[0]) == wanted:
                    return name
            except ValueError:
                continue  # a link-layer address
    return None


def instance_network_env(host: str, env: Mapping[str, str], gpus: int) -> dict[str, str]:
    """What an instance bound to ``host`` adds to its ``env`` (its role's): the address
    variables, and for a CPU instance UCX's device, unless the role's env or the node's
    (the raylet's, which the actor inherits) already sets one. GPU instances keep UCX's
    choice: it picks their RDMA and intra-node paths (set UCX_NET_DEVICES in the role's
    env there)."""
    added = {"PD_HOST": host, "VLLM_HOST_IP": host}
    if gpus == 0 and "UCX_NET_DEVICES" not in env and "UCX_NET_DEVICES" not in os.environ:
        device = interface_of(host)
        if device is not None:
            added["UCX_NET_DEVICES"] = device
    return added
