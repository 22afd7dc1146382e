"""Transfer benchmark: pd's transports (ZMQ, NIXL) against raw TCP and memcpy, in one run.

Moves the KV cache of a 4k-token prompt shaped like Llama-3-8B (32 layers, 8 KV
heads, head dim 128, bf16: 512 MiB in 16-token blocks, 64 regions of 32 KiB blocks)
from a "prefill" process to a "decode" process on loopback, through each of pd's
transports exactly as the connector uses them (the prefill side serves only blocks its
lease table allows). In the same run, as baselines, the same bytes go over a plain TCP
socket (``sendall`` -> ``recv_into`` a preallocated buffer) and through a plain
in-process memcpy. Prints GB/s for each and the ratio transport / raw TCP, and writes
bench/results/transfer.md.

    .venv/bin/python scripts/bench_transfer.py [--repeats 5] [--out bench/results/transfer.md]
    .venv/bin/python scripts/bench_transfer.py --smoke   # tiny KV, seconds; writes to /tmp
    python scripts/bench_transfer.py --device cuda --out bench/results/transfer-gpu.md

With ``--device cuda`` (a CUDA machine; vLLM is not needed) the caches live in GPU
memory laid out like vLLM's paged KV cache, and the baselines add a plain
device-to-device copy and a pinned host -> device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from child_process import ChildProcess

DTYPE = torch.bfloat16
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
START_TIMEOUT_S = 300  # a child fills 512 MiB of caches before it answers; slow when loaded
STEP_TIMEOUT_S = 60


@dataclass(frozen=True)
class KVShape:
    """The KV cache being moved: one prompt's blocks in a cache with some to spare."""

    model: str = "Llama-3-8B"  # whose KV shape this is
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    prompt_tokens: int = 4096

    @property
    def num_request_blocks(self) -> int:
        return self.prompt_tokens // self.block_size

    @property
    def num_cache_blocks(self) -> int:
        return self.num_request_blocks + 64

    @property
    def payload_nbytes(self) -> int:
        """K and V of the request's blocks in every layer, bf16."""
        per_block = self.block_size * self.num_kv_heads * self.head_dim * DTYPE.itemsize
        return 2 * self.num_layers * self.num_request_blocks * per_block

    def describe(self) -> str:
        return (
            f"{self.payload_nbytes / 2**20:.3g} MiB, the KV of a {self.prompt_tokens}-token "
            f"prompt shaped like {self.model}'s ({self.num_layers} layers, "
            f"{self.num_kv_heads} KV heads, head dim "
            f"{self.head_dim}, bf16) in {self.num_request_blocks} blocks of "
            f"{self.block_size} tokens"
        )


LLAMA_3_8B = KVShape()
SMOKE = KVShape("a tiny model", num_layers=2, num_kv_heads=2, head_dim=32, prompt_tokens=256)


def make_caches(shape: KVShape, fill: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
    """vLLM's GPU-style per-layer layout: (2, num_blocks, block_size, heads, dim)."""
    dims = (2, shape.num_cache_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    gen = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn": (
            torch.randn(dims, generator=gen, dtype=torch.float32).to(DTYPE)
            if fill
            else torch.zeros(dims, dtype=DTYPE)
        ).to(device)
        for i in range(shape.num_layers)
    }


def block_ids(shape: KVShape, pattern: str, seed: int) -> tuple[list[int], list[int]]:
    n = shape.num_request_blocks
    if pattern == "contiguous":
        return list(range(8, 8 + n)), list(range(40, 40 + n))
    rng = random.Random(seed)
    return (
        rng.sample(range(shape.num_cache_blocks), n),
        rng.sample(range(shape.num_cache_blocks), n),
    )


# --- pd transport ------------------------------------------------------------------------


def prefill_process(conn: Connection, transport_name: str, shape: KVShape, device: str) -> None:
    """Serves its caches through the transport; grants a lease per request it is sent."""
    from pd.transfer.layout import KVCacheLayout
    from pd.transfer.lease import LeaseTable
    from pd.transfer.transport import get_transport_class

    torch.set_num_threads(1)
    caches = make_caches(shape, fill=True, device=device)
    layout = KVCacheLayout.from_kv_caches(caches, shape.num_cache_blocks, shape.block_size)
    leases = LeaseTable(lease_timeout_s=3600)
    transport = get_transport_class(transport_name)(layout, "127.0.0.1")
    transport.start(leases.may_read)
    conn.send(transport.metadata())
    try:
        while (message := conn.recv()) is not None:
            request_id, ids = message
            leases.grant(request_id, ids)
            conn.send("granted")
    finally:
        transport.close()


def bench_transport(
    transport_name: str, patterns: list[str], repeats: int, shape: KVShape, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per read of the request's blocks, per block id pattern (one prefill child)."""
    from pd.transfer.layout import KVCacheLayout
    from pd.transfer.transport import get_transport_class

    with ChildProcess(prefill_process, transport_name, shape, device) as prefill:
        peer = prefill.recv(timeout_s=START_TIMEOUT_S)
        caches = make_caches(shape, fill=False, device=device)
        layout = KVCacheLayout.from_kv_caches(caches, shape.num_cache_blocks, shape.block_size)
        transport = get_transport_class(transport_name)(layout, "127.0.0.1")
        transport.start(lambda *_: False)  # this side serves nothing
        reference = make_caches(shape, fill=True, device=device)
        seconds: dict[str, list[float]] = {pattern: [] for pattern in patterns}
        try:
            for pattern in patterns:
                for attempt in range(repeats + 1):  # the first is a warm-up
                    src, dst = block_ids(shape, pattern, seed=attempt)
                    request_id = f"bench-{pattern}-{attempt}"
                    prefill.send((request_id, src))
                    if (answer := prefill.recv(timeout_s=STEP_TIMEOUT_S)) != "granted":
                        raise RuntimeError(f"prefill process answered {answer!r}")
                    started = time.perf_counter()
                    deadline = time.monotonic() + STEP_TIMEOUT_S
                    nbytes = transport.read_blocks(peer, request_id, src, dst, deadline)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - started
                    if nbytes != shape.payload_nbytes:
                        raise RuntimeError(f"{nbytes} bytes moved, {shape.payload_nbytes} expected")
                    if attempt == 0:
                        verify(reference, caches, src, dst)
                    else:
                        seconds[pattern].append(elapsed)
            prefill.send(None)
        finally:
            transport.close()
    return seconds


def verify(
    reference: dict[str, torch.Tensor],
    caches: dict[str, torch.Tensor],
    src: list[int],
    dst: list[int],
) -> None:
    for name in reference:
        if not torch.equal(reference[name][:, src], caches[name][:, dst]):
            raise AssertionError(f"bytes differ in {name}")


# --- baselines ---------------------------------------------------------------------------


def tcp_sender(conn: Connection, nbytes: int, repeats: int) -> None:
    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy()
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
        with sock:
            for _ in range(repeats + 1):
                sock.recv(1)  # "go"
                sock.sendall(data.data)


def bench_raw_tcp(repeats: int, shape: KVShape) -> list[float]:
    with ChildProcess(tcp_sender, shape.payload_nbytes, repeats) as sender:
        port = sender.recv(timeout_s=START_TIMEOUT_S)
        buffer = torch.empty(shape.payload_nbytes, dtype=torch.uint8).numpy()
        view = buffer.data
        seconds = []
        with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S) as sock:
            for attempt in range(repeats + 1):
                started = time.perf_counter()
                sock.sendall(b"g")
                received = 0
                while received < len(view):
                    if not (chunk := sock.recv_into(view[received:])):
                        raise RuntimeError("the TCP sender closed the connection early")
                    received += chunk
                if attempt:
                    seconds.append(time.perf_counter() - started)
    return seconds


def bench_copy(
    repeats: int, shape: KVShape, src_device: str, dst_device: str, pinned: bool = False
) -> list[float]:
    """One contiguous copy of the payload (memcpy on CPU, copy engines or HBM on GPU)."""
    src = torch.randint(0, 255, (shape.payload_nbytes,), dtype=torch.uint8)
    src = src.pin_memory() if pinned else src.to(src_device)
    dst = torch.empty(shape.payload_nbytes, dtype=torch.uint8, device=dst_device)
    seconds = []
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        if "cuda" in (src_device, dst_device):
            torch.cuda.synchronize()
        if attempt:
            seconds.append(time.perf_counter() - started)
    return seconds


# --- report ------------------------------------------------------------------------------

TCP_ROW = "raw TCP socket (baseline)"


def run_all(repeats: int, shape: KVShape, device: str) -> tuple[list[tuple[str, list[float]]], str]:
    """Every row of the table (name, seconds per repeat) and a note on skipped ones."""
    from pd.transfer.transport.nixl import nixl_available

    rows = [("memcpy (one process)", bench_copy(repeats, shape, "cpu", "cpu"))]
    if device == "cuda":
        rows += [
            ("GPU -> GPU copy (one process)", bench_copy(repeats, shape, "cuda", "cuda")),
            ("pinned host -> GPU copy", bench_copy(repeats, shape, "cpu", "cuda", pinned=True)),
        ]
    rows.append((TCP_ROW, bench_raw_tcp(repeats, shape)))
    transports, note = ["zmq", "nixl"], ""
    if not nixl_available():
        transports, note = ["zmq"], "NIXL does not import here: no NIXL rows."
    for transport in transports:
        patterns = ["contiguous", "scattered"]
        by_pattern = bench_transport(transport, patterns, repeats, shape, device)
        rows += [(f"pd {transport}, {p} block ids", by_pattern[p]) for p in patterns]
    return rows, note


def report(
    rows: list[tuple[str, list[float]]],
    shape: KVShape,
    device: str,
    repeats: int,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    note: str,
) -> str:
    def gbps(seconds: list[float]) -> float:
        return shape.payload_nbytes / statistics.median(seconds) / 1e9

    tcp = gbps(dict(rows)[TCP_ROW])
    command = " ".join([".venv/bin/python scripts/bench_transfer.py", *sys.argv[1:]])
    (before, after) = (" / ".join(f"{x:.2f}" for x in load) for load in loads)
    lines = [
        "# KV transfer benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Payload: {shape.describe()}, in {device} memory; two processes on loopback"
        f"{' (UCX_NET_DEVICES=lo, as pd sets for a local cluster)' if device == 'cpu' else ''}."
        f" Median of {repeats} runs after a warm-up; bytes verified on the warm-up.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Load average (1, 5, 15 min) "
        f"at the start: {before}; at the end: {after}.",
        "",
        "| path | median ms | GB/s | ratio to raw TCP |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in rows:
        rate = gbps(seconds)
        lines.append(
            f"| {name} | {1000 * statistics.median(seconds):.1f} | {rate:.2f} | {rate / tcp:.2f} |"
        )
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default: " + str(RESULTS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny KV cache and 1 repeat, written to /tmp"
    )
    args = parser.parse_args()
    if args.smoke:
        out = args.out or Path(tempfile.gettempdir()) / "pd-bench-transfer-smoke.md"
        if out.resolve().is_relative_to(RESULTS):
            parser.error("--smoke results are not benchmark results: pick an --out elsewhere")
        shape, repeats = SMOKE, 1
    else:
        out = args.out or RESULTS / ("transfer.md" if args.device == "cpu" else "transfer-gpu.md")
        shape, repeats = LLAMA_3_8B, args.repeats
    if args.device == "cpu":
        os.environ.setdefault("UCX_NET_DEVICES", "lo")  # inherited by the children
    torch.set_num_threads(1)

    load_before = os.getloadavg()
    rows, note = run_all(repeats, shape, args.device)
    text = report(rows, shape, args.device, repeats, (load_before, os.getloadavg()), note)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
