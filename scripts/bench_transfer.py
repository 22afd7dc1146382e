"""Transfer benchmark: pd's transports (ZMQ, NIXL) against raw TCP and memcpy, in one run.

Moves the KV cache of a 4k-token prompt shaped like Llama-3-8B (32 layers, 8 KV
heads, head dim 128, bf16: 512 MiB in 16-token blocks, 64 regions of 32 KiB blocks)
from a "prefill" process to a "decode" process on loopback, through each of pd's
transports exactly as the connector uses them. In the same run, as baselines, the same
bytes go over a plain TCP socket (``sendall`` -> ``recv_into`` a preallocated
buffer) and through a plain in-process memcpy. Prints GB/s for each and the ratio
transport / raw TCP, and writes bench/results/transfer.md.

    .venv/bin/python scripts/bench_transfer.py [--repeats 5] [--out bench/results/transfer.md]
    python scripts/bench_transfer.py --device cuda --out bench/results/transfer-gpu.md

With ``--device cuda`` (a CUDA machine; vLLM is not needed) the caches live in GPU
memory laid out like vLLM's paged KV cache, and the baselines add a plain
device-to-device copy and a pinned host -> device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
PROMPT_TOKENS = 4096
NUM_REQUEST_BLOCKS = PROMPT_TOKENS // BLOCK_SIZE  # 256
NUM_CACHE_BLOCKS = NUM_REQUEST_BLOCKS + 64
DTYPE = torch.bfloat16


def make_caches(fill: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
    """vLLM's GPU-style per-layer layout: (2, num_blocks, block_size, heads, dim)."""
    shape = (2, NUM_CACHE_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn": (
            torch.randn(shape, generator=gen, dtype=torch.float32).to(DTYPE)
            if fill
            else torch.zeros(shape, dtype=DTYPE)
        ).to(device)
        for i in range(NUM_LAYERS)
    }


def payload_nbytes() -> int:
    return 2 * NUM_LAYERS * NUM_REQUEST_BLOCKS * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2


def block_ids(pattern: str, seed: int) -> tuple[list[int], list[int]]:
    if pattern == "contiguous":
        return list(range(8, 8 + NUM_REQUEST_BLOCKS)), list(range(40, 40 + NUM_REQUEST_BLOCKS))
    rng = random.Random(seed)
    return (
        rng.sample(range(NUM_CACHE_BLOCKS), NUM_REQUEST_BLOCKS),
        rng.sample(range(NUM_CACHE_BLOCKS), NUM_REQUEST_BLOCKS),
    )


# --- pd transport ------------------------------------------------------------------------


def prefill_process(conn, transport_name: str, device: str) -> None:
    from pd.transfer.layout import KVCacheLayout
    from pd.transfer.lease import LeaseTable
    from pd.transfer.transport import get_transport_class

    torch.set_num_threads(1)
    caches = make_caches(fill=True, device=device)
    layout = KVCacheLayout.from_kv_caches(caches, NUM_CACHE_BLOCKS, BLOCK_SIZE)
    leases = LeaseTable(lease_timeout_s=3600)
    transport = get_transport_class(transport_name)(layout, "127.0.0.1")
    transport.start(leases.covers)
    conn.send(transport.metadata())
    while (message := conn.recv()) is not None:
        request_id, ids = message
        leases.grant(request_id, ids)
        conn.send("granted")
    # Checksums of the blocks the decode side will verify.
    transport.close()


def bench_transport(
    transport_name: str, pattern: str, repeats: int, device: str = "cpu"
) -> list[float]:
    from pd.transfer.layout import KVCacheLayout
    from pd.transfer.transport import get_transport_class

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_process, args=(child, transport_name, device), daemon=True)
    proc.start()
    peer = parent.recv()
    caches = make_caches(fill=False, device=device)
    layout = KVCacheLayout.from_kv_caches(caches, NUM_CACHE_BLOCKS, BLOCK_SIZE)
    transport = get_transport_class(transport_name)(layout, "127.0.0.1")
    transport.start(lambda *_: False)
    reference = make_caches(fill=True, device=device)
    seconds = []
    try:
        for attempt in range(repeats + 1):  # the first is a warm-up
            src, dst = block_ids(pattern, seed=attempt)
            request_id = f"bench-{attempt}"
            parent.send((request_id, src))
            assert parent.recv() == "granted"
            started = time.perf_counter()
            nbytes = transport.read_blocks(peer, request_id, src, dst, time.monotonic() + 120)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            assert nbytes == payload_nbytes(), nbytes
            if attempt == 0:
                verify(reference, caches, src, dst)
            else:
                seconds.append(elapsed)
    finally:
        parent.send(None)
        proc.join(timeout=30)
        transport.close()
    return seconds


def verify(reference, caches, src, dst) -> None:
    for name in reference:
        if not torch.equal(reference[name][:, src], caches[name][:, dst]):
            raise AssertionError(f"bytes differ in {name}")


# --- baselines ---------------------------------------------------------------------------


def tcp_sender(port_conn, repeats: int) -> None:
    data = torch.randint(0, 255, (payload_nbytes(),), dtype=torch.uint8).numpy()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_conn.send(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            for _ in range(repeats + 1):
                conn.recv(1)  # "go"
                conn.sendall(memoryview(data))


def bench_raw_tcp(repeats: int) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=tcp_sender, args=(child, repeats), daemon=True)
    proc.start()
    port = parent.recv()
    buffer = torch.empty(payload_nbytes(), dtype=torch.uint8).numpy()
    view = memoryview(buffer)
    seconds = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for attempt in range(repeats + 1):
            started = time.perf_counter()
            sock.sendall(b"g")
            received = 0
            while received < len(view):
                received += sock.recv_into(view[received:])
            if attempt:
                seconds.append(time.perf_counter() - started)
    proc.join(timeout=30)
    return seconds


def bench_copy(repeats: int, src_device: str, dst_device: str, pinned: bool = False):
    """One contiguous copy of the payload (memcpy on CPU, copy engines or HBM on GPU)."""
    src = torch.randint(0, 255, (payload_nbytes(),), dtype=torch.uint8)
    src = src.pin_memory() if pinned else src.to(src_device)
    dst = torch.empty(payload_nbytes(), dtype=torch.uint8, device=dst_device)
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


def gbps(seconds: list[float]) -> float:
    return payload_nbytes() / statistics.median(seconds) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/transfer.md"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device, repeats = args.device, args.repeats

    rows: list[tuple[str, list[float]]] = [
        ("memcpy (one process)", bench_copy(repeats, "cpu", "cpu"))
    ]
    if device == "cuda":
        rows += [
            ("GPU -> GPU copy (one process)", bench_copy(repeats, "cuda", "cuda")),
            ("pinned host -> GPU copy", bench_copy(repeats, "cpu", "cuda", pinned=True)),
        ]
    rows.append(("raw TCP socket (baseline)", bench_raw_tcp(repeats)))
    for transport in ("zmq", "nixl"):
        for pattern in ("contiguous", "scattered"):
            seconds = bench_transport(transport, pattern, repeats, device)
            rows.append((f"pd {transport}, {pattern} block ids", seconds))
    tcp = gbps(dict(rows)["raw TCP socket (baseline)"])
    command = "python scripts/bench_transfer.py " + " ".join(sys.argv[1:])
    lines = [
        "# KV transfer benchmark",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Payload: {payload_nbytes() / 2**20:.0f} MiB, the KV of a {PROMPT_TOKENS}-token prompt "
        f"shaped like Llama-3-8B ({NUM_LAYERS} layers, {NUM_KV_HEADS} KV heads, head dim "
        f"{HEAD_DIM}, bf16) in {NUM_REQUEST_BLOCKS} blocks of {BLOCK_SIZE} tokens, in "
        f"{device} memory; two processes on loopback. Median of "
        f"{args.repeats} runs after a warm-up; bytes verified on the warm-up.",
        "",
        f"Machine: {platform.machine()}, {mp.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        "",
        "| path | median ms | GB/s | ratio to raw TCP |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in rows:
        rate = gbps(seconds)
        lines.append(
            f"| {name} | {1000 * statistics.median(seconds):.1f} | {rate:.2f} | {rate / tcp:.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
