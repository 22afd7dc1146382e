"""NIXL: one-sided READs of the prefill worker's KV blocks straight into ours.

Each worker registers vLLM's KV cache memory itself with a NIXL agent (DRAM on CPU,
VRAM on GPU: no staging copy) and prepares, once, a descriptor list with one entry
per (region, block) in a compact strided form. Peers exchange agent metadata and the
block geometry in the handshake; a decode worker then prepares the peer's list once,
and each request's load is a single prepared READ of the peer's blocks into ours.

Two defects of NIXL 1.5.1's Python API are avoided here:
- it hard-codes the UCX progress thread's delay to 0, so every agent spins a whole
  core even when idle: pd builds the agent with a delay (``PROGRESS_DELAY_US``);
- transfers to a stalled peer can stay in progress forever: every wait has a
  deadline. A read past it is not released but handed to the caller
  (``TransferInFlight``), which holds its destination blocks until it ends: UCX
  still completes it when the peer or the link comes back. pd turns on UCX's TCP
  keepalive and user timeout (``UCX_KEEPALIVE_ENV``) so a cut link ends it within
  seconds.
pd never pins threads to cores.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import numpy as np

from pd.transfer.layout import KVCacheLayout
from pd.transfer.transport.base import (
    BlockAuthorizer,
    KVTransport,
    TransferError,
    TransferInFlight,
    TransportMetadata,
)

logger = logging.getLogger(__name__)

# The UCX progress thread sleeps this long between polls: ~4% of a core when idle
# instead of 100%, for well under a millisecond of added latency per transfer.
PROGRESS_DELAY_US = 1000
_POLL_S = (0.0002, 0.005)  # first and largest sleep between completion checks
# UCX over TCP notices a dead link only through the kernel, which by default waits
# for ever on an idle socket and ~15 minutes on one with unacknowledged data: a read
# from a peer whose link was cut then never ends, until the link returns and it lands
# (measured between two hosts: still in flight after 30 s; with keepalive, failed 4 s
# after the cut). Keepalive covers a socket with nothing unacknowledged; the user
# timeout one cut while it had (in CI, 1 run in many: a read still in flight at the
# request's 20 s deadline). A stopped peer's kernel still answers (ACKs, keepalive
# probes): only its resuming or dying ends that read.
UCX_KEEPALIVE_ENV = {
    "UCX_TCP_KEEPIDLE": "2s",
    "UCX_TCP_KEEPINTVL": "1s",
    "UCX_TCP_KEEPCNT": "3",
    "UCX_TCP_USER_TIMEOUT": "5s",
}


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:
        return False
    return True


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(self, layout: KVCacheLayout, host: str) -> None:
        super().__init__(layout, host)
        self._agent: Any = None  # a nixl_agent once started (NIXL ships no types)
        self._mem_type = "VRAM" if layout.device.type == "cuda" else "DRAM"
        self._local_dlist = None
        self._registered = None
        self._peers: dict[str, tuple[object, list[int]]] = {}  # agent -> (dlist, blocks/region)
        self._retired_dlists: list[object] = []  # of peers whose endpoint failed
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, authorize: BlockAuthorizer) -> None:
        # Reads are one-sided: the prefill worker is not asked per read. Its blocks stay
        # allocated until the lease ends, and the lease is released above the transport.
        self._agent = _make_agent(f"pd-{uuid.uuid4().hex[:12]}")
        self._registered = self._agent.register_memory(self._memory_spans(), self._mem_type)
        self._local_dlist = self._agent.prep_xfer_dlist(
            "", self._strided_descs(), mem_type=self._mem_type
        )
        logger.info("pd nixl transport ready (agent %s, %s)", self._agent.name, self._mem_type)

    def metadata(self) -> TransportMetadata:
        assert self._agent is not None, "start() first"
        return {
            "agent": self._agent.name,
            "agent_metadata": base64.b64encode(self._agent.get_agent_metadata()).decode(),
            "regions": json.dumps(self._region_table()),
        }

    def close(self) -> None:
        agent, self._agent = self._agent, None
        if agent is None:
            return
        try:
            for dlist in [*(d for d, _ in self._peers.values()), *self._retired_dlists]:
                agent.release_dlist_handle(dlist)
            for name in self._peers:
                agent.remove_remote_agent(name)
            if self._local_dlist is not None:
                agent.release_dlist_handle(self._local_dlist)
            if self._registered is not None:
                agent.deregister_memory(self._registered)
        except Exception:  # shutting down: nothing left to protect
            logger.debug("nixl close", exc_info=True)
        self._peers.clear()
        self._retired_dlists.clear()

    # --- decode side --------------------------------------------------------------------

    def connect(self, peer: TransportMetadata) -> None:
        """Load the peer's agent metadata and prepare its block list (once per peer)."""
        assert self._agent is not None, "start() first"
        name = str(peer["agent"])
        with self._lock:
            if name in self._peers:
                return
            try:
                regions = json.loads(str(peer["regions"]))
                if [r[1] for r in regions] != [r.block_nbytes for r in self.layout.regions]:
                    raise TransferError("peer's KV regions differ from ours")
                loaded = self._agent.add_remote_agent(base64.b64decode(str(peer["agent_metadata"])))
                descs = np.array(
                    [
                        [addr, nbytes, dev, stride, count]
                        for addr, nbytes, dev, stride, count in regions
                    ],
                    dtype=np.int64,
                )
                dlist = self._agent.prep_xfer_dlist(loaded, descs, mem_type=self._mem_type)
            except TransferError:
                raise
            except Exception as e:
                raise TransferError(f"NIXL could not connect to {name}: {e}") from e
            self._peers[name] = (dlist, [r[4] for r in regions])

    def _read_blocks(
        self,
        peer: TransportMetadata,
        request_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        deadline: float,
    ) -> int:
        self.connect(peer)
        remote_dlist, remote_blocks = self._peers[str(peer["agent"])]
        local_idx, remote_idx = [], []
        for r, region in enumerate(self.layout.regions):
            local_base = r * region.num_blocks
            remote_base = r * remote_blocks[r]
            local_idx += [local_base + b for b in dst_block_ids]
            remote_idx += [remote_base + b for b in src_block_ids]
        agent = self._agent
        assert agent is not None
        name = str(peer["agent"])
        handle = None
        try:
            handle = agent.make_prepped_xfer(
                "READ",
                self._local_dlist,
                np.asarray(local_idx, dtype=np.int32),
                remote_dlist,
                np.asarray(remote_idx, dtype=np.int32),
            )
            state = agent.transfer(handle)
        except Exception as e:  # not posted: nothing of it can land
            if handle is not None:
                _Read(agent, handle, "ERR").settle(0)  # releases the handle
            self._disconnected(name, remote_dlist)
            raise TransferError(f"NIXL read of {request_id} could not start: {e}") from e
        read = _Read(agent, handle, state)
        if not read.settle(deadline):
            # Kept, not released: UCX may still complete it (see ``TransferInFlight``).
            def settle(deadline: float) -> bool:
                ended = read.settle(deadline)
                if ended and read.state == "ERR":
                    self._disconnected(name, remote_dlist)  # else the next read fails on it too
                return ended

            raise TransferInFlight(
                f"NIXL read of {request_id} passed its deadline, still in flight", settle
            )
        if read.state == "ERR":
            # e.g. nixlRemoteDisconnectError: the peer died, or the link (keepalive)
            self._disconnected(name, remote_dlist)
            raise TransferError(f"NIXL read of {request_id} failed: {read.error or 'ERR'}")
        return len(src_block_ids) * self.layout.bytes_per_block

    def _disconnected(self, name: str, dlist: object) -> None:
        """Forget a peer whose endpoint failed: UCX never reconnects a failed endpoint
        (measured: every later read fails), so the next ``connect`` loads it afresh.
        ``dlist``: the peer's list the failed read used; a peer loaded afresh since stays."""
        agent = self._agent
        with self._lock:
            known = self._peers.get(name)
            if known is None or known[0] is not dlist or agent is None:
                return
            del self._peers[name]
            # Other threads may still hold the list: released only at close.
            self._retired_dlists.append(known[0])
            try:
                agent.remove_remote_agent(name)
            except Exception:
                logger.debug("could not remove NIXL agent %s", name, exc_info=True)
        logger.info("pd nixl: endpoint to %s failed; reconnecting on the next read", name)

    # --- memory ---------------------------------------------------------------------------

    def _region_table(self) -> list[list[int]]:
        """Per region: [address, block bytes, device, block stride, number of blocks]."""
        table = []
        for region in self.layout.regions:
            blocks = region.blocks
            device = blocks.device.index or 0
            table.append(
                [
                    blocks.data_ptr(),
                    region.block_nbytes,
                    device,
                    blocks.stride(0),
                    region.num_blocks,
                ]
            )
        return table

    def _strided_descs(self) -> np.ndarray:
        return np.array(self._region_table(), dtype=np.int64)

    def _memory_spans(self) -> list[tuple[int, int, int, str]]:
        """Each distinct storage under the regions, registered once."""
        spans: dict[int, tuple[int, int, int, str]] = {}
        for region in self.layout.regions:
            storage = region.blocks.untyped_storage()
            device = region.blocks.device.index or 0
            spans[storage.data_ptr()] = (storage.data_ptr(), storage.nbytes(), device, "")
        return list(spans.values())


class _Read:
    """One posted READ, until it ends. Its handle is released only once it has: a read
    given up at its deadline stays here, and its destination blocks stay held above the
    transport, until UCX ends it (done, or failed: the peer or the link found dead)."""

    def __init__(self, agent: Any, handle: Any, state: str) -> None:
        self._agent = agent
        self._handle = handle
        self.state = state
        self.error: Exception | None = None  # what NIXL raised when it failed
        self._lock = threading.Lock()  # settle may be called from several threads

    def settle(self, deadline: float) -> bool:
        """Wait until the read ended (DONE or ERR) or ``deadline`` passed; whether it ended."""
        with self._lock:
            sleep_s = _POLL_S[0]
            try:
                while self.state not in ("DONE", "ERR"):
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(sleep_s)
                    sleep_s = min(sleep_s * 2, _POLL_S[1])
                    self.state = self._agent.check_xfer_state(self._handle)
            except Exception as e:  # e.g. nixlRemoteDisconnectError: it failed, it ended
                self.state, self.error = "ERR", e
            self._release()
            return True

    def _release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            logger.debug("could not release a NIXL transfer handle", exc_info=True)


def _make_agent(name: str):
    """A NIXL agent with a UCX backend whose progress thread does not busy-poll."""
    import nixl._api as api

    for key, value in UCX_KEEPALIVE_ENV.items():  # read when the UCX backend starts
        os.environ.setdefault(key, value)
    strict = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT  # our loads run on many threads
    agent = api.nixl_agent(name, api.nixl_agent_config(backends=[], sync_mode=strict))
    # nixl_agent() fixes pthrDelay at 0; rebuild its core agent with a delay before any
    # backend (and so any progress thread) exists.
    bindings = _bindings_of(api)
    config = bindings.nixlAgentConfig()
    config.useProgThread = True
    config.useListenThread = False
    config.listenPort = 0
    config.syncMode = strict.value
    config.pthrDelay = PROGRESS_DELAY_US
    config.lthrDelay = 100_000
    config.captureTelemetry = False
    agent.agent = bindings.nixlAgent(name, config)
    agent.plugin_list = agent.agent.getAvailPlugins()
    if "UCX" not in agent.plugin_list:
        raise RuntimeError(f"NIXL has no UCX plugin (plugins: {agent.plugin_list})")
    agent.create_backend("UCX", {})
    return agent


def _bindings_of(api):
    import importlib

    package = api.nixl_agent.__module__.rsplit(".", 1)[0]  # nixl_cu12 / nixl_cu13 / ...
    return importlib.import_module(f"{package}._bindings")
