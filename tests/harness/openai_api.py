"""The requests, clients and metric readings the pd-serve tests share."""

from __future__ import annotations

import httpx
from openai import OpenAI

from pd.serve_process import PdServeProcess
from pd.vllm_server import parse_prometheus
from scripts.scenarios.client import SERVED

__all__ = ["GREEDY", "MESSAGES", "PROMPT", "SERVED", "client_of", "grew", "proxy_metrics"]

PROMPT = "Disaggregated serving splits prefill from decode. " * 6
GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode."}]


def client_of(serve: PdServeProcess) -> OpenAI:
    """The official client of the cluster's proxy: no retries, a generous timeout."""
    return OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0, timeout=120)


def proxy_metrics(serve: PdServeProcess) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{serve.url}/metrics", timeout=10).text)


def grew(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0) - before.get(name, 0)
