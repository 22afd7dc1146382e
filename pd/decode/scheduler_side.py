"""Decode role, scheduler side: tell vLLM the prompt's KV comes from a prefill instance.

Request lifecycle on a decode instance:
1. The proxy sends the original request plus the prefill instance's
   ``kv_transfer_params`` (``do_remote_prefill: true``, where the blocks are).
2. ``get_num_new_matched_tokens`` reports every prompt token the local prefix cache
   lacks as external and asynchronous; vLLM allocates blocks and parks the request.
3. ``update_state_after_alloc`` records which local blocks to fill from which remote
   blocks; the next step's metadata hands the load to the workers
   (``pd.decode.kv_consumer``).
4. The workers report the request in ``finished_recving`` (and in
   ``failed_recving`` on failure, which makes vLLM recompute the prompt). vLLM then
   computes the last prompt token itself and decodes.

A request sent alongside its prefill (``pd_rendezvous``, no block ids yet) goes the
same way; its worker first waits for the prefill instance to finish the prompt. If
the request ends meanwhile (the client went away), the workers stop waiting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pd.transfer.metadata import LoadSpec, load_spec_from_params
from pd.transfer.params import KVTransferParams

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class DecodeScheduler:
    def __init__(self) -> None:
        self._loads: list[LoadSpec] = []
        self._cancelled: list[str] = []

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        params = _params(request)
        if not params.do_remote_prefill:
            return 0, False
        count = _remote_tokens(request, params) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = _params(request)
        if not params.do_remote_prefill:
            return
        _loaded_once(request)  # load once, even if called again
        local_block_ids = blocks.get_unhashed_block_ids() if num_external_tokens > 0 else []
        self._add_load(request, params, local_block_ids, num_external_tokens > 0)

    def request_finished(self, request: Request) -> None:
        """A request finished before its load was scheduled (an abort): release the lease.

        One whose load may still wait for its prefill stops waiting.
        """
        params = _params(request)
        if params.do_remote_prefill:
            _loaded_once(request)
            self._add_load(request, params, [], reports_completion=False)
        elif params.pd_rendezvous:
            self._cancelled.append(request.request_id)  # the workers ignore ended loads

    def take_loads(self) -> tuple[list[LoadSpec], list[str]]:
        """(loads to start, requests whose loads to stop waiting for) since the last call."""
        loads, cancelled = self._loads, self._cancelled
        self._loads, self._cancelled = [], []
        return loads, cancelled

    def _add_load(
        self,
        request: Request,
        params: KVTransferParams,
        local_block_ids: list[int],
        reports_completion: bool,
    ) -> None:
        try:
            spec = load_spec_from_params(
                request.request_id, params, local_block_ids, reports_completion
            )
        except ValueError as e:
            # Without a usable address nothing can be loaded or released; if vLLM
            # waits for this load, the worker reports it failed (recompute).
            logger.warning("pd: request %s: %s; recomputing its prompt", request.request_id, e)
            spec = LoadSpec(
                request_id=request.request_id,
                remote_request_id="",
                remote_engine_id="",
                remote_host="",
                remote_ports=(),
                remote_block_ids=(),
                local_block_ids=tuple(local_block_ids),
                reports_completion=reports_completion,
            )
        self._loads.append(spec)


def _params(request: Request) -> KVTransferParams:
    """The request's params; malformed ones read as none (decode computes the prompt)."""
    try:
        return KVTransferParams.from_dict(request.kv_transfer_params)
    except ValueError as e:
        logger.warning("pd: request %s: %s; ignoring its kv_transfer_params",
                       request.request_id, e)  # fmt: skip
        return KVTransferParams()


def _loaded_once(request: Request) -> None:
    """Mark the request's load as scheduled, so vLLM's later calls do not add it again.

    In place: vLLM's request and its sampling parameters hold the same dict.
    """
    assert request.kv_transfer_params is not None
    request.kv_transfer_params.update(KVTransferParams(do_remote_prefill=False).to_dict())


def _remote_tokens(request: Request, params: KVTransferParams) -> int:
    """How many of the prompt's tokens the prefill instance holds KV for.

    All of them, unless the prompt continues past what prefill computed: the
    first-token flow (``pd.proxy.first_token``) sends decode the prompt plus prefill's
    first token, whose KV nobody computed yet; decode computes it itself.
    """
    prompt = len(request.prompt_token_ids or [])
    remote = params.remote_num_tokens
    if remote is not None and 0 < remote < prompt:
        return remote
    return prompt
