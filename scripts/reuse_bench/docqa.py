"""Long-document QA (the shape of LMCache's long_doc_qa): D documents of L tokens whose
total is several times the engine's KV cache, and questions cycling over them, one
request at a time. Cycling in order is the engine's LRU at its worst: by the time a
document comes back, its blocks were evicted, so only a store below the engine can
give them back. TTFT is the client's: request sent to the first streamed chunk."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
import numpy as np

from .settings import Settings


def documents(settings: Settings, seed: int = 7) -> list[list[int]]:
    """Token ids (the byte-level vocabulary, 0-255) of each document: unrelated texts."""
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(settings.doc_tokens)]
            for _ in range(settings.num_docs)]  # fmt: skip


def question(settings: Settings, doc: int, round_: int) -> list[int]:
    """Another question each round (the document's blocks repeat, the tail does not)."""
    rng = random.Random(f"q{doc}:{round_}")
    return [rng.randrange(256) for _ in range(settings.question_tokens)]


def ttft_s(
    client: httpx.Client, url: str, served: str, prompt: list[int], max_tokens: int
) -> float:
    """Seconds from sending the request to its first streamed chunk with a choice (as
    ``vllm bench serve`` counts it); the rest of the answer is read and dropped."""
    body = {"model": served, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    first: float | None = None
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            data = line.removeprefix("data: ")
            if (
                first is None
                and data != line
                and data != "[DONE]"
                and json.loads(data).get("choices")
            ):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no token streamed")
    return first


def ask(url: str, settings: Settings, docs: list[list[int]], round_: int) -> list[float]:
    """One pass over the documents, in order: each one's TTFT in ms."""
    with httpx.Client(timeout=300) as client:
        return [
            1000 * ttft_s(client, url, settings.served_name, doc + question(settings, i, round_),
                          settings.answer_tokens)
            for i, doc in enumerate(docs)
        ]  # fmt: skip


def summary(ttfts_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(ttfts_ms),
        "p50_ms": float(np.percentile(ttfts_ms, 50)),
        "p90_ms": float(np.percentile(ttfts_ms, 90)),
        "mean_ms": sum(ttfts_ms) / len(ttfts_ms),
        "ttfts_ms": [round(t, 2) for t in ttfts_ms],
    }
