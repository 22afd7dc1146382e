"""Readings from the Prometheus metrics of pd's proxy and of vLLM instances."""

from __future__ import annotations

import httpx

# The decode instance's running totals that split a request's time on decode.
DECODE_SUMS = {
    "ttft": "vllm:time_to_first_token_seconds_sum",  # the decode server got it -> 1st token
    "queue": "vllm:request_queue_time_seconds_sum",  # waiting, the KV load included
    "prefill": "vllm:request_prefill_time_seconds_sum",  # scheduled -> 1st token (engine)
}


def metrics_text(url: str, client: httpx.Client | None = None) -> str:
    get = client.get if client is not None else httpx.get
    return get(f"{url}/metrics", timeout=30).text


def first_token_handoffs(url: str) -> tuple[float, float, float]:
    """pd's proxy at ``url``: (requests so far whose first token came from the prefill
    leg, requests answered so far, seconds spent in prefill legs so far)."""
    handoffs = answered = prefill_s = 0.0
    for line in metrics_text(url).splitlines():
        if line.startswith("pd_first_token_handoffs_total "):
            handoffs = float(line.split()[1])
        elif line.startswith("pd_requests_total{") and 'status="200"' in line:
            answered += float(line.rsplit(" ", 1)[1])
        elif line.startswith("pd_prefill_seconds_sum "):
            prefill_s = float(line.split()[1])
    return handoffs, answered, prefill_s


def share(before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """``"handed off of answered"`` between two first_token_handoffs() readings."""
    return f"{after[0] - before[0]:.0f} of {after[1] - before[1]:.0f}"


def decode_sums(decode_url: str) -> dict[str, float]:
    """The decode instance's running totals of DECODE_SUMS (one request's share is the
    difference across it)."""
    totals = dict.fromkeys(DECODE_SUMS, 0.0)
    for line in metrics_text(decode_url).splitlines():
        for key, name in DECODE_SUMS.items():
            if line.startswith(name):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


# Where an instance's requests waited: vLLM's per-request histograms, read as means.
WAITS = {
    "queue": "vllm:request_queue_time_seconds",  # arrival -> scheduled (a KV load included)
    "prefill": "vllm:request_prefill_time_seconds",  # scheduled -> first token
    # the server got the request -> its first token left the engine (the HTTP and
    # tokenizing on either side excluded); minus the two above: IPC and engine steps
    "server_ttft": "vllm:time_to_first_token_seconds",
}
# The same read from pd's proxy: the first token's way through it.
PROXY_WAITS = {
    "ttft": "pd_time_to_first_token_seconds",  # the proxy got the request -> sent token 1
    "prefill_leg": "pd_prefill_seconds",  # the prefill leg, its HTTP both ways included
}


def wait_totals(url: str, names: dict[str, str] = WAITS) -> dict[str, float]:
    """The running ``<key>_sum`` and ``<key>_count`` of ``names`` at ``url``."""
    totals = {f"{k}_{part}": 0.0 for k in names for part in ("sum", "count")}
    for line in metrics_text(url).splitlines():
        for key, name in names.items():
            for part in ("sum", "count"):
                if line.startswith(f"{name}_{part}"):
                    totals[f"{key}_{part}"] += float(line.rsplit(" ", 1)[1])
    return totals


def wait_means_ms(
    before: dict[str, float], after: dict[str, float], names: dict[str, str] = WAITS
) -> dict[str, float]:
    """Mean ms per request finished between two wait_totals() readings."""
    means = {}
    for key in names:
        count = after[f"{key}_count"] - before[f"{key}_count"]
        if count > 0:
            means[key] = round(1000 * (after[f"{key}_sum"] - before[f"{key}_sum"]) / count, 1)
    return means


def proxy_own_time_buckets(url: str, client: httpx.Client) -> dict[float, float]:
    """The proxy's pd_proxy_overhead_seconds histogram: upper bound -> cumulative count."""
    return histogram(metrics_text(url, client), "pd_proxy_overhead_seconds")


def engine_itl_buckets(decode_url: str) -> dict[float, float]:
    """The decode instance's vllm:inter_token_latency_seconds: the gaps between a
    request's tokens as its engine core produced them (before any IPC, HTTP or proxy)."""
    return histogram(metrics_text(decode_url), "vllm:inter_token_latency_seconds")


def histogram(text: str, name: str) -> dict[float, float]:
    """Prometheus histogram ``name``, summed over its label sets: bound -> cumulative count."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            bound = float(line.split('le="')[1].split('"')[0])
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile_ms(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding a share ``q`` of the observations between two
    scrapes: an upper bound of the quantile."""
    delta = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    for bound, count in delta.items():
        if total and count >= q * total:
            return 1000 * bound
    return float("nan")
