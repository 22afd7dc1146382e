"""ZMQ over TCP: works anywhere TCP does.

Prefill side: one ROUTER socket on a free port, served by one thread. A ``ReadBlocks``
for leased blocks is answered with a ``BlocksHeader`` and then one message per KV
region holding the requested blocks in request order. On the CPU each frame is a
view of vLLM's KV cache itself, one per run of consecutive block ids, sent
zero-copy (a badly fragmented request is gathered into one frame instead); device
memory is staged through host memory.

Decode side: each transfer thread keeps one DEALER socket per prefill worker. It
scatters every data message into its own blocks as soon as it arrives, so copying
overlaps with the bytes still on the wire.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings

import msgspec
import torch
import zmq

from pd.transfer import messages as msg
from pd.transfer.layout import KVRegion, block_runs
from pd.transfer.transport.base import (
    BlockAuthorizer,
    KVTransport,
    TransferError,
    TransportMetadata,
)

logger = logging.getLogger(__name__)

_POLL_INTERVAL_MS = 100
# Above this many runs of consecutive block ids, a region travels as one gathered frame.
_MAX_FRAMES_PER_REGION = 16


class ZmqTransport(KVTransport):
    name = "zmq"

    def __init__(self, layout, host: str) -> None:
        super().__init__(layout, host)
        self._context: zmq.Context | None = None
        self._port: int | None = None
        self._server: threading.Thread | None = None
        self._stop = threading.Event()
        self._local = threading.local()
        self._client_sockets: list[zmq.Socket] = []
        self._client_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, authorize: BlockAuthorizer) -> None:
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # never drop silently: raise instead
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.LINGER, 0)
        self._port = router.bind_to_random_port(f"tcp://{self.host}")
        self._server = threading.Thread(
            target=self._serve, args=(router, authorize), name="pd-zmq-server", daemon=True
        )
        self._server.start()
        logger.info("pd zmq transport serving blocks on tcp://%s:%d", self.host, self._port)

    def metadata(self) -> TransportMetadata:
        assert self._port is not None, "start() first"
        return {"endpoint": f"tcp://{self.host}:{self._port}"}

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.join(timeout=2)
            self._server = None
        with self._client_lock:
            for sock in self._client_sockets:
                sock.close(linger=0)
            self._client_sockets.clear()
        if self._context is not None:
            self._context.term()
            self._context = None

    # --- prefill side -------------------------------------------------------------------

    def _serve(self, router: zmq.Socket, authorize: BlockAuthorizer) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(_POLL_INTERVAL_MS):
                    continue
                identity, payload = router.recv_multipart()
                try:
                    request = msg.decode(payload)
                except msgspec.DecodeError:
                    logger.warning("pd zmq transport: dropped an undecodable message")
                    continue
                if not isinstance(request, msg.ReadBlocks):
                    logger.warning("pd zmq transport: unexpected %s", type(request).__name__)
                    continue
                try:
                    self._answer(router, identity, request, authorize)
                except zmq.ZMQError as e:  # the peer went away; nothing to answer
                    logger.info("pd zmq transport: peer gone during %s: %s", request.request_id, e)
        finally:
            router.close(linger=0)

    def _answer(
        self,
        router: zmq.Socket,
        identity: bytes,
        request: msg.ReadBlocks,
        authorize: BlockAuthorizer,
    ) -> None:
        def header(status: str, reason: str = "", num_frames: int = 0) -> bytes:
            return msg.encode(msg.BlocksHeader(request.transfer_id, status, reason, num_frames))

        if not authorize(request.request_id, request.block_ids):
            router.send_multipart(
                [identity, header("refused", "the lease ended or does not cover these blocks")]
            )
            return
        invalid = [b for b in request.block_ids if not 0 <= b < self.layout.regions[0].num_blocks]
        if invalid:
            router.send_multipart([identity, header("refused", f"bad block ids {invalid[:4]}")])
            return

        runs = block_runs(request.block_ids)
        tag = request.transfer_id.encode()
        router.send_multipart([identity, header("ok", num_frames=len(self.layout.regions))])
        for region in self.layout.regions:
            frames = _region_frames(region, runs)
            router.send_multipart([identity, tag, *frames], copy=False)

    # --- decode side --------------------------------------------------------------------

    def _read_blocks(
        self,
        peer: TransportMetadata,
        request_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        deadline: float,
    ) -> int:
        endpoint = str(peer["endpoint"])
        sock = self._socket_for(endpoint)
        try:
            return self._read(sock, request_id, src_block_ids, dst_block_ids, deadline)
        except BaseException:
            # The socket may still receive this transfer's frames: never reuse it.
            self._drop_socket(endpoint)
            raise

    def _read(
        self,
        sock: zmq.Socket,
        request_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        deadline: float,
    ) -> int:
        transfer_id = uuid.uuid4().hex
        sock.send(msg.encode(msg.ReadBlocks(transfer_id, request_id, src_block_ids)))
        header = _recv_header(sock, transfer_id, deadline)
        if header.status != "ok":
            raise TransferError(f"prefill refused {request_id}: {header.reason}")

        expected = len(self.layout.regions)
        if header.num_frames != expected:
            raise TransferError(f"expected {expected} regions, peer announced {header.num_frames}")
        tag = transfer_id.encode()
        nbytes = 0
        for region in self.layout.regions:
            frames = _recv_until(sock, deadline)
            if len(frames) < 2 or frames[0].bytes != tag:
                raise TransferError("unexpected message in the middle of a transfer")
            position = 0
            for frame in frames[1:]:
                data = frame.buffer
                count, rest = divmod(len(data), region.block_nbytes)
                if rest or position + count > len(dst_block_ids):
                    raise TransferError(f"{region.name}: {len(data)} bytes do not fit the blocks")
                _scatter(region, data, dst_block_ids[position : position + count])
                position += count
                nbytes += len(data)
            if position != len(dst_block_ids):
                raise TransferError(f"{region.name}: got {position} of {len(dst_block_ids)} blocks")
        return nbytes

    def _socket_for(self, endpoint: str) -> zmq.Socket:
        sockets: dict[str, zmq.Socket] = self._local.__dict__.setdefault("sockets", {})
        sock = sockets.get(endpoint)
        if sock is None:
            assert self._context is not None, "start() first"
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(endpoint)
            sockets[endpoint] = sock
            with self._client_lock:
                self._client_sockets.append(sock)
        return sock

    def _drop_socket(self, endpoint: str) -> None:
        sock = self._local.__dict__.get("sockets", {}).pop(endpoint, None)
        if sock is not None:
            with self._client_lock:
                self._client_sockets.remove(sock)
            sock.close(linger=0)


def _region_frames(region: KVRegion, runs: list[tuple[int, int, int]]) -> list:
    """A region's requested blocks, in request order, as buffers zmq can send.

    One zero-copy view per run of consecutive ids; a fragmented request (many short
    runs) is gathered into one buffer instead, as thousands of frames cost more.
    """
    if len(runs) <= _MAX_FRAMES_PER_REGION:
        return [_host_bytes(region.blocks[first : first + length]) for _, first, length in runs]
    num_blocks = sum(length for _, _, length in runs)
    gathered = torch.empty((num_blocks, region.block_nbytes), dtype=torch.uint8)
    for position, first, length in runs:
        gathered[position : position + length].copy_(region.blocks[first : first + length])
    return [gathered.numpy()]


def _host_bytes(rows: torch.Tensor):
    if rows.device.type != "cpu":
        rows = rows.to("cpu")  # staging copy for device memory
    elif not rows.is_contiguous():
        rows = rows.contiguous()
    return rows.numpy()  # zero-copy view of the KV cache when rows are dense


def _scatter(region: KVRegion, data: memoryview, dst_block_ids: list[int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that zmq's buffer is read-only
        src = torch.frombuffer(data, dtype=torch.uint8).view(-1, region.block_nbytes)
    # A loop of slice copies beats index_copy_ several times over on CPU.
    for position, first, length in block_runs(dst_block_ids):
        region.blocks[first : first + length].copy_(src[position : position + length])


def _recv_until(sock: zmq.Socket, deadline: float) -> list[zmq.Frame]:
    remaining_ms = int((deadline - time.monotonic()) * 1000)
    if remaining_ms <= 0 or not sock.poll(remaining_ms):
        raise TransferError("deadline passed waiting for the prefill instance")
    return sock.recv_multipart(copy=False)


def _recv_header(sock: zmq.Socket, transfer_id: str, deadline: float) -> msg.BlocksHeader:
    while True:
        frames = _recv_until(sock, deadline)
        if len(frames) != 1:
            continue  # a data message of an earlier, abandoned transfer
        try:
            header = msg.decode(frames[0].buffer)
        except msgspec.DecodeError:
            continue
        if isinstance(header, msg.BlocksHeader) and header.transfer_id == transfer_id:
            return header
