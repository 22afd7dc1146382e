"""Test "hosts" on one machine: network namespaces on a bridge, with a Ray cluster across them.

    python scripts/test_hosts.py up 2       # namespaces pd-host-0, pd-host-1 on a bridge
    python scripts/test_hosts.py ray-up 2   # Ray head in pd-host-0, a worker node in the others
    python scripts/test_hosts.py status
    python scripts/test_hosts.py down       # stops everything in them, removes them
    python scripts/test_hosts.py --smoke    # up 2, ping across, down (no Ray)

Needs root (``ip netns``). Every host ``i`` is namespace ``pd-host-i`` with one
interface ``pdh<i>`` (address ``10.213.0.<i+1>/24``), the end of a veth pair whose
other end (``pdh<i>-br``) sits on bridge ``pdh-br0`` in the root namespace, which has
``10.213.0.254/24`` so that tests on the machine reach the hosts. Nothing else is
touched: the namespaces get no default route and the root namespace routes only the
new subnet to the bridge, so their traffic stays between them. ``up`` refuses a subnet
that any other interface already uses; ``--subnet`` picks another /24.

Ray (``ray-up``): the head in host 0 (GCS port 6379, dashboard 8265 on the host's
address), a worker node in every other host, each started with ``--node-ip-address``
its host's address, a custom resource ``pd-host-<i>: 1`` and a node label
``pd-host=host-<i>`` (what cluster.yaml's ``placement`` names), and one Ray temp dir for
the whole test cluster (``/tmp/pdh-ray``). Ray's token authentication is on, with a token
of the test cluster's own (``/tmp/pdh-auth/token``): a driver needs ``ray_env()``.
Ray's other ports (raylet, object manager, workers) are picked by Ray; each namespace
has its own port space, so none of them collides with anything on the machine.

``down`` ends every process inside the namespaces (``ip netns pids``: only what runs in
them, never a process of the machine by name), then deletes the namespaces, veths and
bridge. ``up``, ``ray-up`` and ``down`` are idempotent and safe after a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_PREFIX = "pd-host-"
BRIDGE = "pdh-br0"
DEFAULT_SUBNET = "10.213.0.0/24"
RAY_PORT = 6379
DASHBOARD_PORT = 8265
RAY_TMPDIR = "/tmp/pdh-ray"  # short: Ray's socket paths under it must fit a Unix address
RAY_TOKEN = "/tmp/pdh-auth/token"  # the test cluster's Ray auth token
HOST_LABEL = "pd-host"  # node label key: pd-host=host-<i>


def ray_env() -> dict[str, str]:
    """The environment of every Ray process of the test cluster, drivers too: its temp dir
    and token authentication with a token of its own (created on first use)."""
    token = Path(RAY_TOKEN)
    if not token.exists():
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    return {
        **os.environ,
        "RAY_TMPDIR": RAY_TMPDIR,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": RAY_TOKEN,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


class HostsError(RuntimeError):
    """The hosts cannot be set up; the message says why."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise HostsError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass(frozen=True)
class Host:
    index: int
    address: str  # without prefix length

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def interface(self) -> str:
        """The host's interface, inside its namespace (what UCX_NET_DEVICES names)."""
        return f"pdh{self.index}"

    @property
    def bridge_port(self) -> str:
        """The veth end on the bridge, in the root namespace (its counters: the host's traffic)."""
        return f"pdh{self.index}-br"

    @property
    def label(self) -> str:
        return f"host-{self.index}"

    @property
    def resource(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the host."""
        return ["ip", "netns", "exec", self.netns]

    def bridge_bytes(self) -> tuple[int, int]:
        """(bytes received, bytes sent) by the host's veth end on the bridge, as counted so far."""
        stats = Path("/sys/class/net") / self.bridge_port / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore the host's link to the bridge."""
        _run("ip", "link", "set", self.bridge_port, "up" if up else "down")

    def shape(self, rate: str) -> None:
        """Limit what the host sends to ``rate`` (tc's units, e.g. ``20mbit``): a slow link,
        so that a transfer lasts long enough to be cut in its middle."""
        self.unshape()
        _run(*self.exec_prefix(), "tc", "qdisc", "add", "dev", self.interface, "root", "tbf",
             "rate", rate, "burst", "32kbit", "latency", "400ms")  # fmt: skip

    def unshape(self) -> None:
        _run(*self.exec_prefix(), "tc", "qdisc", "del", "dev", self.interface, "root", check=False)

    def pids(self) -> list[int]:
        done = _run("ip", "netns", "pids", self.netns, check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


class NetnsHosts:
    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.prefixlen != 24 or not self.subnet.is_private:
            raise HostsError(f"--subnet {subnet}: give a private /24")
        self.bridge_address = str(self.subnet.network_address + 254)

    def host(self, index: int) -> Host:
        return Host(index, str(self.subnet.network_address + index + 1))

    def existing(self) -> list[Host]:
        """The hosts (namespaces) that exist now, in order."""
        names = _run("ip", "-j", "netns", "list", check=False).stdout.strip()
        found = [e["name"] for e in json.loads(names or "[]")]
        indices = sorted(
            int(n.removeprefix(NETNS_PREFIX))
            for n in found
            if n.startswith(NETNS_PREFIX) and n.removeprefix(NETNS_PREFIX).isdigit()
        )
        return [self.host(i) for i in indices]

    # --- up ----------------------------------------------------------------------------------

    def up(self, count: int) -> list[Host]:
        if count < 1 or count > 200:
            raise HostsError("the number of hosts must be 1..200")
        self._check_subnet_free()
        if not _link_exists(BRIDGE):
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        if not _has_address(BRIDGE, self.bridge_address):
            _run("ip", "addr", "add", f"{self.bridge_address}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        hosts = [self.host(i) for i in range(count)]
        for host in hosts:
            self._host_up(host)
        return hosts

    def _check_subnet_free(self) -> None:
        """No interface but ours may hold an address in the subnet, nor a route cover it."""
        ours = {BRIDGE} | {h.bridge_port for h in self.existing()}
        addresses = json.loads(_run("ip", "-j", "addr").stdout)
        for link in addresses:
            for info in link.get("addr_info", []):
                if info.get("family") != "inet" or link["ifname"] in ours:
                    continue
                net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                if net.overlaps(self.subnet):
                    raise HostsError(
                        f"{self.subnet} overlaps {link['ifname']}'s {net}: pick --subnet"
                    )
        for route in json.loads(_run("ip", "-j", "route").stdout):
            dst = route.get("dst", "default")
            if dst == "default" or route.get("dev") in ours:
                continue
            if ipaddress.ip_network(dst, strict=False).overlaps(self.subnet):
                raise HostsError(f"{self.subnet} overlaps the route to {dst}: pick --subnet")

    def _host_up(self, host: Host) -> None:
        if host.netns not in {h.netns for h in self.existing()}:
            _run("ip", "netns", "add", host.netns)
        inside = ["ip", "-n", host.netns]
        if not _link_exists(host.bridge_port):
            _run("ip", "link", "add", host.bridge_port, "type", "veth", "peer", "name",
                 host.interface, "netns", host.netns)  # fmt: skip
        _run("ip", "link", "set", host.bridge_port, "master", BRIDGE)
        _run("ip", "link", "set", host.bridge_port, "up")
        listed = _run(*inside, "-j", "addr", "show", "dev", host.interface).stdout
        if host.address not in listed:
            _run(*inside, "addr", "add", f"{host.address}/24", "dev", host.interface)
        _run(*inside, "link", "set", host.interface, "up")
        _run(*inside, "link", "set", "lo", "up")

    # --- Ray -----------------------------------------------------------------------------------

    def ray_up(self, count: int, cpus: float = 2, timeout_s: float = 120) -> str:
        """A Ray head in host 0 and a worker node in hosts 1..count-1; the GCS address."""
        hosts = self.up(count)
        head = hosts[0]
        address = f"{head.address}:{RAY_PORT}"
        env = ray_env()
        ray = str(Path(sys.executable).with_name("ray"))
        for host in hosts:
            if self._ray_running(host):
                continue
            common = [
                "--node-ip-address", host.address, "--num-cpus", f"{cpus:g}",
                "--resources", json.dumps({host.resource: 1}),
                "--labels", f"{HOST_LABEL}={host.label}",
                "--disable-usage-stats",
            ]  # fmt: skip
            if host is head:
                args = [
                    "--head", "--port", str(RAY_PORT), "--temp-dir", RAY_TMPDIR,
                    "--dashboard-host", head.address, "--dashboard-port", str(DASHBOARD_PORT),
                ]  # fmt: skip
            else:
                args = ["--address", address]
            done = subprocess.run(
                [*host.exec_prefix(), ray, "start", *args, *common],
                capture_output=True, text=True, env=env, timeout=timeout_s,
            )  # fmt: skip
            if done.returncode != 0:
                raise HostsError(f"ray start in {host.netns} failed:\n{done.stderr[-3000:]}")
        self.wait_nodes(count, timeout_s)
        return address

    @staticmethod
    def _ray_running(host: Host) -> bool:
        return any(_process_name(pid) == "raylet" for pid in host.pids())

    def wait_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Until the head's GCS lists ``count`` live nodes (asked from inside host 0)."""
        code = (
            "import ray; ray.init(address='auto', logging_level='ERROR');"
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout_s
        alive = "?"
        env = ray_env()
        while time.monotonic() < deadline:
            done = subprocess.run(
                [*self.host(0).exec_prefix(), sys.executable, "-c", code],
                capture_output=True, text=True, env=env, timeout=timeout_s,
            )  # fmt: skip
            alive = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
            if alive == str(count):
                return
            time.sleep(1)
        raise HostsError(f"Ray has {alive} live nodes after {timeout_s:.0f}s, not {count}")

    @staticmethod
    def stop_processes(host: Host, grace_s: float = 10) -> None:
        """End every process inside ``host`` (its Ray node and all it runs): SIGTERM, then
        SIGKILL after ``grace_s``."""
        _end_processes(host.pids(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while host.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        _end_processes(host.pids(), signal.SIGKILL)
        _wait_gone(host, 10)

    def raylet_pid(self, host: Host) -> int | None:
        return next((p for p in host.pids() if _process_name(p) == "raylet"), None)

    # --- down ------------------------------------------------------------------------------------

    def down(self, grace_s: float = 10) -> None:
        hosts = self.existing()
        for host in hosts:
            _end_processes(host.pids(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(h.pids() for h in hosts):
            time.sleep(0.2)
        for host in hosts:
            _end_processes(host.pids(), signal.SIGKILL)
        for host in hosts:
            _wait_gone(host, 10)
            _run("ip", "netns", "del", host.netns, check=False)
            if _link_exists(host.bridge_port):  # deleting the namespace ends the pair
                _run("ip", "link", "del", host.bridge_port, check=False)
        if _link_exists(BRIDGE):
            _run("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
        shutil.rmtree(Path(RAY_TOKEN).parent, ignore_errors=True)

    def status(self) -> str:
        lines = []
        for host in self.existing():
            raylet = self.raylet_pid(host)
            ray_state = f"raylet {raylet}" if raylet else "no Ray"
            lines.append(
                f"{host.netns}: {host.address} on {host.interface} "
                f"({len(host.pids())} processes, {ray_state})"
            )
        return "\n".join(lines) or "no hosts"


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _has_address(link: str, address: str) -> bool:
    return address in _run("ip", "-j", "addr", "show", "dev", link).stdout


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _end_processes(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(host: Host, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while host.pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    if left := host.pids():
        raise HostsError(f"{host.netns}: processes {left} did not end")


def _check_tcp(src: Host, listen_prefix: list[str], address: str, port: int = 47001) -> None:
    """A TCP connection from ``src`` reaches a listener at ``address`` (which
    ``listen_prefix`` runs: inside a host, or in the root namespace when empty)."""
    listen = (
        f"import socket; s = socket.create_server(({address!r}, {port})); print('up', flush=True);"
        "s.settimeout(20); s.accept()"
    )
    server = subprocess.Popen(
        [*listen_prefix, sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        connect = f"import socket; socket.create_connection(({address!r}, {port}), timeout=5)"
        _run(*src.exec_prefix(), sys.executable, "-c", connect)
    finally:
        server.kill()
        server.wait()


def smoke(hosts: NetnsHosts) -> None:
    """up 2, each host reaches the other and the machine, nothing routes out, down."""
    hosts.down()
    try:
        a, b = hosts.up(2)
        hosts.up(2)  # idempotent
        for src, dst in ((a, b), (b, a)):
            _check_tcp(src, dst.exec_prefix(), dst.address)
        _check_tcp(a, [], hosts.bridge_address)  # the machine (root namespace) reaches them
        out = _run(*a.exec_prefix(), "ip", "route", "get", "192.0.2.1", check=False)
        assert out.returncode != 0, f"{a.netns} has a route out: {out.stdout}"
        print(hosts.status())
    finally:
        hosts.down()
    assert not hosts.existing() and not _link_exists(BRIDGE), "down left something"
    print("smoke ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["up", "ray-up", "down", "status"])
    parser.add_argument("count", nargs="?", type=int, default=2, help="number of hosts")
    parser.add_argument(
        "--subnet", default=DEFAULT_SUBNET, help="a private /24 (default %(default)s)"
    )
    parser.add_argument("--cpus", type=float, default=2, help="Ray CPUs per node (ray-up)")
    parser.add_argument("--smoke", action="store_true", help="up 2, check, down")
    args = parser.parse_args(argv)
    hosts = NetnsHosts(args.subnet)
    try:
        if args.smoke:
            smoke(hosts)
        elif args.command == "up":
            for host in hosts.up(args.count):
                print(f"{host.netns} {host.address} {host.interface}")
        elif args.command == "ray-up":
            print(f"ray: {hosts.ray_up(args.count, args.cpus)}")
        elif args.command == "down":
            hosts.down()
        elif args.command == "status":
            print(hosts.status())
        else:
            parser.error("give a command or --smoke")
    except HostsError as e:
        print(f"test_hosts: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
