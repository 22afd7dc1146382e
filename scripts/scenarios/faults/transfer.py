"""A KV transfer peer that stalls between the two legs: decode recomputes within its
transfer deadline and answers exactly as one instance alone would."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import httpx

from pd.serve_process import PdServeProcess

from ..bounds import ENGINE_SLACK_S
from ..client import Outcome, completion_body, send
from ..probes import check_served_with_transfer, instance_metrics
from ..results import ScenarioResult


async def stalled_transfer_peer(
    serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult
) -> None:
    """The KV transfer peer stalls. Driven on the cluster's own instances with vLLM's
    disaggregation protocol (as the proxy speaks it), so the stall falls exactly
    between the two legs: (1) prefill answered, then its vLLM is stopped (SIGSTOP)
    before decode pulls the KV; (2) the KV's address is a side channel that accepts
    connections and never answers (a peer stalled at first contact). Decode must
    answer in full, with the single-instance answer, within its transfer deadline."""
    instances = serve.instances()
    prefill, decode = instances["pd-prefill-0"], instances["pd-decode-0"]
    bound = float(serve.connector["transfer_timeout_s"]) + ENGINE_SLACK_S

    async def reference(body: dict[str, Any]) -> Outcome:
        # The greedy answer, computed by one instance on its own: decode's must match.
        outcome = await send(http, prefill.url, body, 60)
        r.require(
            "prefill answers a plain request",
            outcome.kind == "completed",
            f"{outcome.kind} {outcome.status} {outcome.detail}",
        )
        return outcome

    async def counters() -> dict[str, float]:
        m = await instance_metrics(decode, http)
        return {
            "loads": m["vllm:pd_kv_transfers_total"],
            "failures": m["vllm:pd_kv_transfer_failures_total"],
            "handshake_failures": m["vllm:pd_kv_handshake_failures_total"],
            "recomputed": m['vllm:prompt_tokens_by_source_total{source="local_compute"}'],
        }

    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}

    async def decode_with(body: dict[str, Any], params: dict[str, Any], what: str) -> Outcome:
        outcome = await send(http, decode.url, {**body, "kv_transfer_params": params}, bound)
        r.outcomes.append(outcome)
        r.check(
            f"{what}: decode answers in full within transfer_timeout_s + {ENGINE_SLACK_S} s "
            f"({bound:.0f}s)",
            outcome.kind == "completed",
            f"{outcome.kind} {outcome.status} {outcome.elapsed_s:.1f}s {outcome.detail}",
        )
        return outcome

    def same_answer(what: str, outcome: Outcome, expected: Outcome) -> None:
        if outcome.kind == "completed":
            r.check(
                f"{what}: the answer equals the single-instance answer",
                token_ids(outcome) == token_ids(expected),
                f"{token_ids(outcome)} vs {token_ids(expected)}",
            )

    # (1) The real prefill instance, stopped between its answer and decode's pull.
    what = "prefill stopped after answering"
    body = {**completion_body(1000, 16), "return_token_ids": True}
    expected = await reference(body)
    leg = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    answer = (await http.post(f"{prefill.url}/v1/completions", json=leg, timeout=60)).json()
    params = answer.get("kv_transfer_params")
    r.require(
        "prefill returns kv_transfer_params",
        bool(params),
        str(answer)[:300]
        if not params
        else f"{len(params['remote_block_ids'])} blocks held for decode",
    )
    before = await counters()
    prefill.stop()
    try:
        outcome = await decode_with(body, params, what)
        after = await counters()
    finally:
        prefill.resume()
    same_answer(what, outcome, expected)
    d = delta(before, after)
    loaded = d["loads"] == 1 and d["failures"] == 0
    recomputed = d["failures"] == 1 and d["recomputed"] >= 1000
    r.check(f"{what}: decode loaded the KV or recomputed the prompt", loaded or recomputed, str(d))
    r.notes.append(
        f"{what}: answered in {outcome.elapsed_s:.1f}s; "
        + (
            "the KV load succeeded anyway (the transport reads the stopped process's memory "
            "without its help, as NIXL/UCX does on one host)"
            if loaded
            else "the load failed at its deadline and decode recomputed the prompt"
        )
    )

    # (2) A peer that accepts connections and never answers.
    what = "side channel never answers"
    body = {**completion_body(1000, 16), "return_token_ids": True}
    expected = await reference(body)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the kernel; nobody ever reads them
        port = silent.getsockname()[1]
        stalled = {
            **params,
            "remote_engine_id": f"stalled-{uuid.uuid4().hex[:8]}",
            "remote_request_id": f"stalled-{uuid.uuid4().hex[:8]}",
            "remote_port": port,
            "remote_ports": [port],
        }
        before = await counters()
        outcome = await decode_with(body, stalled, what)
        after = await counters()
    same_answer(what, outcome, expected)
    d = delta(before, after)
    r.check(
        f"{what}: the handshake failed and decode recomputed the prompt",
        d["failures"] == 1 and d["handshake_failures"] == 1 and d["recomputed"] >= 1000,
        str(d),
    )
    r.notes.append(
        f"{what}: answered in {outcome.elapsed_s:.1f}s (handshake deadline "
        f"{serve.connector['handshake_timeout_s']} s)"
    )
    await check_served_with_transfer(serve, http, r, "after the stalls")


def token_ids(outcome: Outcome) -> list[int]:
    return outcome.answer["choices"][0]["token_ids"]
