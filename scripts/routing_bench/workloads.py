"""The two workloads, both as timed traces ``vllm bench serve`` replays (each hash id
stands for CHUNK_TOKENS fixed tokens, derived from Python's ``hash()`` under
``PYTHONHASHSEED=0``), and the reuse an ideal cache would get from each.

conversation   ../shared/traces/conversation-k40-b16.jsonl (Mooncake's, scaled)
shared-prefix  generated: T tenants, each with a long context of its own, and short
               unique questions to a random tenant arriving as a Poisson process
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .settings import CHUNK_TOKENS, TRACE, Settings

WORKLOADS = ("conversation", "shared-prefix")
# The generated trace's hash ids: tenant t's context chunks, then one id per question
# chunk, far from the conversation trace's ids.
TENANT_ID_BASE, QUESTION_ID_BASE = 10_000_000, 20_000_000


def conversation(settings: Settings) -> list[dict[str, Any]]:
    with TRACE.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(settings.trace_prompts), strict=False)]


def shared_prefix(settings: Settings, seed: int = 14) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    per_context = settings.context_tokens // CHUNK_TOKENS
    per_question = -(-settings.question_tokens // CHUNK_TOKENS)
    requests, now_ms = [], 0.0
    for i in range(settings.questions):
        now_ms += 1000 * rng.expovariate(settings.question_rate)
        tenant = rng.randrange(settings.tenants)
        context = [TENANT_ID_BASE + tenant * per_context + c for c in range(per_context)]
        question = [QUESTION_ID_BASE + i * per_question + c for c in range(per_question)]
        requests.append({
            "timestamp": round(now_ms), "tenant": tenant,
            "input_length": settings.context_tokens + settings.question_tokens,
            "output_length": settings.answer_tokens, "hash_ids": context + question,
        })  # fmt: skip
    return requests


def requests_of(workload: str, settings: Settings) -> list[dict[str, Any]]:
    return conversation(settings) if workload == "conversation" else shared_prefix(settings)


def write_trace(requests: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def ideal_reuse(requests: list[dict[str, Any]], block_tokens: int) -> dict[str, float]:
    """The share of prompt tokens one unbounded cache shared by all instances could
    serve, counted as vLLM counts hits: whole ``block_tokens`` blocks, never the
    prompt's last token; a block is cached once an earlier request had the same tokens
    up to its end (same leading chunks of the same lengths)."""
    seen: set[tuple[tuple[int, int], ...]] = set()
    reusable = total = 0
    for request in requests:
        chunks, left = [], int(request["input_length"])
        for hash_id in request["hash_ids"]:
            if left <= 0:
                break
            size = min(CHUNK_TOKENS, left)
            chunks += [(int(hash_id), size)] * size  # one entry per token
            left -= size
        tokens = len(chunks)
        total += tokens
        loadable = (tokens - 1) // block_tokens
        hit = 0
        while hit < loadable and tuple(chunks[: (hit + 1) * block_tokens]) in seen:
            hit += 1
        reusable += hit * block_tokens
        for b in range(1, tokens // block_tokens + 1):
            seen.add(tuple(chunks[: b * block_tokens]))
    return {"prompt_tokens": total, "reusable_tokens": reusable,
            "share": reusable / total if total else 0.0}  # fmt: skip
