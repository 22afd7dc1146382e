"""The node-shared store process and its client: real processes, real ipc:// sockets.

No vLLM here. Every server a test starts is stopped by the ``store`` fixture, found by
the pid file it writes in its socket dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest
import zmq

from pd.store import protocol
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.server import PID_FILE
from pd.store.spawn import LOG_FILE, ensure_server, ping
from pd.store.stats import StoreStats
from tests.store_helpers import NAMESPACE, block_hashes, files_under, payload

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # bound on anything that waits for a process; never reached when all is well

# A client process: `python -c CLIENT <config json> <put|get> <n> <seed>`; prints JSON.
CLIENT = """
import json, sys
from pd.store.client import StoreClient
from pd.store.config import StoreConfig
from pd.store.spawn import ping
from tests.store_helpers import NAMESPACE, block_hashes, payload
config = StoreConfig.from_dict(json.loads(sys.argv[1]))
mode, n, seed = sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = StoreClient(config)
client.register(NAMESPACE)
hashes = block_hashes(n, seed)
out = {"pid": None}
if mode == "put":
    out["stored"] = client.put_many(
        NAMESPACE, [(h, payload(NAMESPACE.key(h))) for h in hashes]
    )
else:
    hit = client.lookup(NAMESPACE, hashes)
    got = client.get_many(NAMESPACE, hashes)
    out["hit"] = [hit.host_blocks, hit.disk_blocks]
    out["right"] = [g == payload(NAMESPACE.key(h)) for g, h in zip(got, hashes)]
out["pid"] = ping(config, 5000)
client.close()
print(json.dumps(out))
"""

# `python -c SPAWN_AND_WAIT <config json>`: start the store, print its pid, wait.
SPAWN_AND_WAIT = """
import json, sys, time
from pd.store.config import StoreConfig
from pd.store.spawn import ensure_server, ping
config = StoreConfig.from_dict(json.loads(sys.argv[1]))
assert ensure_server(config, 10.0)
print(ping(config, 5000), flush=True)
time.sleep(600)
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreConfig]:
    # The socket dir is short (sun_path holds 107 bytes), the disk tier under tmp_path.
    socket_dir = tempfile.mkdtemp(prefix="pds-", dir="/tmp")
    config = StoreConfig(
        host_gib=0.01,
        disk_path=str(tmp_path / "disk"),
        disk_gib=0.01,
        socket_dir=socket_dir,
        timeout_ms=2000,  # generous: a loaded CI machine must not turn calls into misses
    )
    yield config
    stop_server(config)
    shutil.rmtree(socket_dir, ignore_errors=True)


def server_pid(config: StoreConfig) -> int | None:
    try:
        return int((Path(str(config.socket_dir)) / PID_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A server this process spawned is reaped by the client's thread; until then a
    # zombie, which counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop_server(config: StoreConfig, sig: int = signal.SIGTERM) -> None:
    pid = server_pid(config)
    if pid is None or not alive(pid):
        return
    os.kill(pid, sig)
    wait_until(lambda: not alive(pid), f"store process {pid} to exit")


def run_client(config: StoreConfig, mode: str, n: int, seed: str = "doc") -> dict:  # type: ignore[type-arg]
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(config.to_dict()), mode, str(n), seed],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def server_log(config: StoreConfig) -> str:
    return (Path(str(config.socket_dir)) / LOG_FILE).read_text()


def test_put_in_one_process_get_in_another(store: StoreConfig) -> None:
    put = run_client(store, "put", 6)
    assert put["stored"] == 6
    got = run_client(store, "get", 8)  # the last two were never stored
    assert got["pid"] == put["pid"] is not None  # one store served both
    assert got["hit"] == [6, 0]
    assert got["right"] == [True] * 6 + [False] * 2
    assert len(files_under(Path(str(store.disk_path)))) == 6  # written through to disk


def test_stats_round_trip(store: StoreConfig) -> None:
    client = StoreClient(store)
    try:
        hashes = block_hashes(4, "stats")
        items = [(h, payload(NAMESPACE.key(h), 2000)) for h in hashes[:3]]
        assert client.put_many(NAMESPACE, items) == 3
        hit = client.lookup(NAMESPACE, hashes)
        assert client.lookup(NAMESPACE, hashes) == hit
        assert (hit.host_blocks, hit.disk_blocks) == (3, 0)
        got = client.get_many(NAMESPACE, hashes)
        assert got == [data for _, data in items] + [None]
        stats = client.stats()
        assert stats is not None and stats.host is not None and stats.disk is not None
        assert (stats.lookups, stats.lookup_blocks, stats.lookup_host_blocks) == (2, 8, 6)
        assert (stats.host.puts, stats.host.bytes_stored, stats.host.entries) == (3, 6000, 3)
        assert (stats.host.hits, stats.host.misses, stats.host.bytes_loaded) == (3, 1, 6000)
        assert (stats.disk.puts, stats.disk.entries, stats.disk.misses) == (3, 3, 1)
        assert stats.host.capacity_bytes == store.host_bytes
        assert stats.disk.capacity_bytes == store.disk_bytes
        assert client.failed_calls == 0
    finally:
        client.close()


def test_killed_store_misses_within_the_timeout_then_respawns_with_its_disk_entries(
    store: StoreConfig,
) -> None:
    client = StoreClient(store)
    try:
        hashes = block_hashes(5, "kill")
        items = [(h, payload(NAMESPACE.key(h))) for h in hashes]
        client.register(NAMESPACE)
        assert client.put_many(NAMESPACE, items) == 5
        first = server_pid(store)
        assert first is not None
        stop_server(store, signal.SIGKILL)

        # Down: every call misses, each well within a bound (a hang would hit it).
        bound_s = 4 * store.timeout_ms / 1000 + 1.0
        for call in (
            lambda: client.lookup(NAMESPACE, hashes).num_blocks == 0,
            lambda: client.get_many(NAMESPACE, hashes) == [None] * 5,
            lambda: client.put_many(NAMESPACE, items) == 0,
            lambda: client.stats() is None,
        ):
            started = time.monotonic()
            assert call()
            assert time.monotonic() - started < bound_s
        assert client.failed_calls >= 4

        # A later call respawns it; the disk tier's index is rebuilt from the files.
        wait_until(lambda: client.lookup(NAMESPACE, hashes).num_blocks == 5, "a respawned store")
        second = server_pid(store)
        assert second is not None and second != first
        assert client.lookup(NAMESPACE, hashes).disk_blocks == 5  # the host tier died with it
        # A lookup's disk-only hit is hinted into the page cache for the load to come.
        wait_until(
            lambda: (client.stats() or StoreStats(None, None)).readahead_blocks >= 5,
            "the lookup's readahead",
        )
        assert client.get_many(NAMESPACE, hashes) == [data for _, data in items]
        stats = client.stats()
        assert stats is not None and stats.disk is not None
        assert stats.disk.recovered_entries == 5
        assert stats.promotions == 5
        assert client.reconnects >= 1
        assert "recovered 5 entries" in server_log(store)
    finally:
        client.close()


def test_racing_clients_start_one_server(store: StoreConfig) -> None:
    n = 4
    go = Path(str(store.socket_dir)) / "go"
    race = (  # imports first, so the processes race on the spawn itself
        "import os, sys, time\n"
        "import pd.store.client, tests.store_helpers\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.002)\n"
        "exec(sys.argv.pop(1))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", race, CLIENT, json.dumps(store.to_dict()), "put", "2", f"r{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    time.sleep(0.5)  # let them all import and wait at the line
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=WAIT_S * 2)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert {r["pid"] for r in results} == {server_pid(store)}
    assert [r["stored"] for r in results] == [2] * n
    log = server_log(store)
    assert log.count("serving ipc://") == 1, log
    assert "another store process serves" not in log  # none was even started twice


def test_second_server_for_a_socket_dir_exits_at_once(store: StoreConfig) -> None:
    client = StoreClient(store)
    try:
        client.register(NAMESPACE)
        first = server_pid(store)
        second = subprocess.run(
            [sys.executable, "-m", "pd.store.server", "--config", json.dumps(store.to_dict())],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert second.returncode == 0
        assert "another store process serves" in second.stderr
        assert ping(store, 5000) == first == server_pid(store)
    finally:
        client.close()


def test_store_exits_once_its_clients_are_gone(store: StoreConfig) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pd.store.server",
            "--config",
            json.dumps(store.to_dict()),
            "--linger-s",
            "0.5",
            "--owner-pid",
            str(owner.pid),
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: ping(store, 500) is not None, "the store to serve")
        assert run_client(store, "put", 1)["stored"] == 1  # a client process comes and goes
        owner.wait(timeout=WAIT_S)
        _, err = server.communicate(timeout=WAIT_S)
        assert server.returncode == 0
        assert "no live client" in err
        assert not os.path.exists(store.socket_path)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_spawned_store_is_no_descendant_of_its_spawner(store: StoreConfig) -> None:
    """vLLM's shutdown kills its process tree: the store a client started must not be in
    it, so it outlives its spawner's tree being killed and serves the next client."""
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWN_AND_WAIT, json.dumps(store.to_dict())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert spawner.stdout is not None
        served_by = int(spawner.stdout.readline())
        assert served_by == server_pid(store)
        tree = {p.pid for p in psutil.Process(spawner.pid).children(recursive=True)}
        assert served_by not in tree
        for pid in tree:  # as vLLM's shutdown does
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        spawner.kill()
        spawner.wait(timeout=WAIT_S)
        assert ping(store, 5000) == served_by
        assert run_client(store, "put", 1)["pid"] == served_by
    finally:
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait()


def test_under_pd_serve_a_client_waits_for_the_store_actor_and_starts_none(
    store: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PD_STORE_MANAGED", "1")
    started = time.monotonic()
    assert not ensure_server(store, wait_s=0.5)
    assert time.monotonic() - started >= 0.5  # it waited for one...
    assert server_pid(store) is None  # ...and started none
    assert not os.path.exists(Path(str(store.socket_dir)) / LOG_FILE)


def test_corrupt_disk_entry_reads_as_a_miss(store: StoreConfig) -> None:
    hashes = block_hashes(3, "corrupt")
    items = [(h, payload(NAMESPACE.key(h))) for h in hashes]
    client = StoreClient(store)
    try:
        assert client.put_many(NAMESPACE, items) == 3
    finally:
        client.close()
    stop_server(store)  # the host tier goes; what is left is on disk

    victim = next(p for p in files_under(Path(str(store.disk_path))) if hashes[1].hex() in p.name)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the payload: only the CRC catches it
    victim.write_bytes(bytes(data))

    client = StoreClient(store)
    try:
        got = client.get_many(NAMESPACE, hashes)
        assert got == [items[0][1], None, items[2][1]]
        stats = client.stats()
        assert stats is not None and stats.disk is not None
        assert stats.disk.corrupt_dropped == 1
        assert not victim.exists()
        assert client.lookup(NAMESPACE, hashes).num_blocks == 1  # stops at the dropped one
    finally:
        client.close()


def test_one_client_shared_by_threads(store: StoreConfig) -> None:
    client = StoreClient(store)
    errors: list[str] = []

    def work(seed: str) -> None:
        hashes = block_hashes(8, seed)
        items = [(h, payload(NAMESPACE.key(h), 5000)) for h in hashes]
        for _ in range(5):
            if client.put_many(NAMESPACE, items) != 8:
                errors.append(f"{seed}: put")
            if client.get_many(NAMESPACE, hashes) != [data for _, data in items]:
                errors.append(f"{seed}: get")
            if client.lookup(NAMESPACE, hashes).num_blocks != 8:
                errors.append(f"{seed}: lookup")

    try:
        client.register(NAMESPACE)
        threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT_S * 2)
        assert errors == []
        assert client.failed_calls == 0
    finally:
        client.close()


def test_other_protocol_version_is_refused_and_the_store_keeps_serving(
    store: StoreConfig,
) -> None:
    client = StoreClient(store)
    try:
        client.register(NAMESPACE)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(store.endpoint)
        body = msgspec.msgpack.encode(protocol.Stats())
        sock.send(msgspec.msgpack.encode([protocol.PROTOCOL_VERSION + 1, 1, 1, msgspec.Raw(body)]))
        assert sock.poll(5000)
        _, reply = protocol.decode_reply(sock.recv())
        assert isinstance(reply, protocol.Error) and "protocol version" in reply.reason
        sock.send(b"garbage")
        assert sock.poll(5000)
        _, reply = protocol.decode_reply(sock.recv())
        assert isinstance(reply, protocol.Error)
        sock.close()
        assert client.stats() is not None
    finally:
        client.close()


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"host_gb": 1}, "host_gb"),
        ({"host_gib": -1}, "host_gib"),
        ({"host_gib": "1"}, "host_gib"),
        ({"disk_gib": None}, "disk_gib"),
        ({"disk_path": ""}, "disk_path"),
        ({"save_decode": "yes"}, "save_decode"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"timeout_ms": 1.5}, "timeout_ms"),
        ({"socket_dir": "/" + "s" * 120}, "socket_dir"),
    ],
)
def test_bad_config_rejected_with_the_key_named(extra: dict, key: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=key):
        StoreConfig.from_dict(extra)


def test_server_refuses_a_bad_config_naming_the_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pd.store.server", "--config", json.dumps({"disk_gb": 1})],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert result.returncode != 0
    assert "disk_gb" in result.stderr


def test_config_defaults_share_a_socket_dir_by_disk_path(tmp_path: Path) -> None:
    a = StoreConfig.from_dict({"disk_path": str(tmp_path / "d"), "host_gib": 1})
    b = StoreConfig.from_dict({"disk_path": str(tmp_path / "d"), "host_gib": 2, "timeout_ms": 9})
    c = StoreConfig.from_dict({"disk_path": str(tmp_path / "e")})
    assert a.socket_dir == b.socket_dir != c.socket_dir
    assert StoreConfig().socket_dir != StoreConfig(host_gib=2).socket_dir
    assert a.disk_path == str(tmp_path / "d") and os.path.isabs(str(a.socket_dir))
    assert StoreConfig.from_dict(a.to_dict()) == a


def test_a_lookup_is_answered_while_every_worker_is_busy_with_a_put(store: StoreConfig) -> None:
    from pd.store import server as server_module
    from pd.store.host import HostTier
    from pd.store.tiered import TieredStore

    release = threading.Event()

    class StuckPuts(TieredStore):  # a put that waits, as one behind a slow disk would
        def put(self, key, data, owned=False):  # type: ignore[no-untyped-def]
            assert release.wait(WAIT_S)
            return super().put(key, data, owned)

    stop = threading.Event()
    Path(str(store.socket_dir)).mkdir(parents=True, exist_ok=True)
    srv = server_module._Server(
        StuckPuts(HostTier(store.host_bytes), None), store, 60.0, None, stop
    )
    runner = threading.Thread(target=srv.run, daemon=True)
    runner.start()
    putters = [StoreClient(store) for _ in range(server_module._WORKERS + 1)]
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda c=c, i=i: results.append(
                c.put_many(
                    NAMESPACE, [(block_hashes(1, f"stuck{i}")[0], payload(NAMESPACE.key(b"x")))]
                )
            )
        )
        for i, c in enumerate(putters)
    ]
    looker = StoreClient(store)
    try:
        for t in threads:
            t.start()
        wait_until(lambda: srv._jobs.qsize() >= 1, "every worker to hold a put and one to queue")
        assert looker.lookup(NAMESPACE, block_hashes(2, "stuck0")).num_blocks == 0  # answered
        assert looker.failed_calls == 0 and not results  # while no put has finished
        release.set()
        for t in threads:
            t.join(WAIT_S)
        assert sorted(results) == [1] * len(putters)
        assert looker.lookup(NAMESPACE, block_hashes(1, "stuck0")).num_blocks == 1
    finally:
        release.set()
        for c in [*putters, looker]:
            c.close()
        stop.set()
        runner.join(WAIT_S)
