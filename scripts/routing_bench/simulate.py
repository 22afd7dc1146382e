"""The conversation trace through ``routing: kv_aware`` without engines: where each
request went and who held its prefix, to see where a policy loses hits.

    .venv/bin/python -m scripts.routing_bench.simulate [--set key=value ...] [--requests]

The real ``KVAware`` routes each request of the trace (its arrivals as the benchmark
replays them); its index is fed as the instances' events would feed it (each instance
stores the full blocks of every prompt it served; caches are unbounded, as 1 GiB is
for this trace). Load is a crude model, enough for the policy's load terms to act:
each prefill instance computes its queue of prompt tokens serially at
``PREFILL_TOKENS_PER_S``, decode computes a decode-only request's uncached tokens at
``DECODE_TOKENS_PER_S`` and holds every request ``DECODE_S``. The hit rate is counted
as the benchmark counts it (scripts/routing_bench/report.py): prompt tokens no
instance computed; vLLM never reuses a prompt's last token. Not a benchmark: TTFTs
here mean nothing; the hits depend on the load model only through the load terms.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Any

from pd.proxy.block_hashing import BlockHasher
from pd.proxy.instances import Instance
from pd.proxy.kv_index import KVIndex
from pd.proxy.kv_routing import KVAware
from pd.proxy.routing import RoutingRequest
from pd.routing_settings import KVAwareSettings

from .settings import BLOCK_SIZE, CHUNK_TOKENS, FULL
from .workloads import conversation, ideal_reuse

PREFILL_TOKENS_PER_S = 500.0
DECODE_TOKENS_PER_S = 3000.0
DECODE_S = 1.0  # 32 output tokens at ~30 ms


def prompt_ids(request: dict[str, Any]) -> list[int]:
    """CHUNK_TOKENS distinct tokens per hash id, cut at the input length (as timed_trace)."""
    ids: list[int] = []
    for h in request["hash_ids"]:
        ids += [h * CHUNK_TOKENS + i for i in range(CHUNK_TOKENS)]
    return ids[: int(request["input_length"])]


class Ids:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    async def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        return self.ids


@dataclass
class Outcome:
    index: int
    decision: str
    prefill: str | None
    prompt_tokens: int
    held: dict[str, int]  # tokens of its prefix each instance held when it was routed
    computed: int  # prompt tokens computed for it, on any instance


def loadable(held_tokens: int, n: int) -> int:
    return min(held_tokens, (n - 1) // BLOCK_SIZE * BLOCK_SIZE)


async def simulate(settings: KVAwareSettings, sec_multiplier: float) -> list[Outcome]:
    clock = [0.0]  # the simulated time, for the index's expectations
    index = KVIndex(clock=lambda: clock[0])
    policy = KVAware(settings, index=index)
    hasher = BlockHasher(BLOCK_SIZE)
    prefills = [Instance(f"pd-prefill-{i}", "prefill", "x", healthy=True) for i in (0, 1)]
    decode = Instance("pd-decode-0", "decode", "x", healthy=True)
    everyone = [*prefills, decode]
    for inst in everyone:
        index.stored(inst.name, [], block_size=BLOCK_SIZE)
    # What each instance's cache really holds (the index hears of it when it is stored).
    truth: dict[str, set[int]] = {inst.name: set() for inst in everyone}
    rate = {inst.name: PREFILL_TOKENS_PER_S for inst in prefills}
    rate[decode.name] = DECODE_TOKENS_PER_S
    queues: dict[str, list[Any]] = {inst.name: [] for inst in everyone}
    busy = {inst.name: False for inst in everyone}
    pending: list[tuple[float, int, str, Any]] = []  # (time, seq, kind, payload)
    seq = 0
    out: list[Outcome] = []
    requests = conversation(FULL)

    def at(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(pending, (t, seq, kind, payload))
        seq += 1

    def held_tokens(name: str, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in truth[name]:
                break
            n += 1
        return n * BLOCK_SIZE

    def next_job(name: str, now: float) -> None:
        if busy[name] or not queues[name]:
            return
        job = queues[name].pop(0)
        outcome, hashes = job[0], job[1]
        n = outcome.prompt_tokens
        outcome.computed = n - loadable(held_tokens(name, hashes), n)
        busy[name] = True
        at(now + outcome.computed / rate[name], "computed", (name, job))

    for i, r in enumerate(requests):
        at(float(r["timestamp"]) * sec_multiplier, "arrive", i)
    while pending:
        now, _, kind, payload = heapq.heappop(pending)
        clock[0] = now
        if kind == "arrive":
            ids = prompt_ids(requests[payload])
            n = len(ids)
            hashes = hasher.hashes(ids)
            held = {inst.name: index.cached_blocks(inst.name, hashes) * BLOCK_SIZE
                    for inst in everyone}  # fmt: skip
            route = await policy.route(
                RoutingRequest("completions", {"prompt": ids}, Ids(ids)), prefills, [decode]
            )
            prefill_name = route.prefill.name if route.prefill else None
            outcome = Outcome(payload, route.kind, prefill_name, n, held, 0)
            out.append(outcome)
            d = route.decode
            d.inflight_requests += 1
            computes = route.prefill or d
            if route.prefill is not None:
                route.prefill.inflight_requests += 1
                route.prefill.outstanding_prompt_tokens += n
            queues[computes.name].append((outcome, hashes, route))
            next_job(computes.name, now)
        elif kind == "computed":
            name, (outcome, hashes, route) = payload
            busy[name] = False
            truth[name].update(hashes)
            index.stored(name, hashes)
            if route.prefill is not None:
                route.prefill.inflight_requests -= 1
                route.prefill.outstanding_prompt_tokens -= outcome.prompt_tokens
                truth[route.decode.name].update(hashes)  # decode caches the KV it loaded
                index.stored(route.decode.name, hashes)
            at(now + DECODE_S, "done", route.decode)
            next_job(name, now)
        elif kind == "done":
            payload.inflight_requests -= 1
    return out


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    total = sum(o.prompt_tokens for o in outcomes)
    computed = sum(o.computed for o in outcomes)
    # What was computed although some instance held it: the hits lost, by route kind.
    lost: Counter[str] = Counter()
    for o in outcomes:
        best = loadable(max(o.held.values()), o.prompt_tokens)
        lost[o.decision] += o.computed - (o.prompt_tokens - best)
    # The rest: computed although an earlier request had computed it (in flight then,
    # or held by an instance only after this one was routed), by route kind.
    late: Counter[str] = Counter()
    seen: set[int] = set()
    hasher = BlockHasher(BLOCK_SIZE)
    for o, r in zip(outcomes, conversation(FULL), strict=True):
        hashes = hasher.hashes(prompt_ids(r))
        earlier = 0
        while earlier < len(hashes) and hashes[earlier] in seen:
            earlier += 1
        seen.update(hashes)
        best = loadable(max(o.held.values()), o.prompt_tokens)
        late[o.decision] += max(0, loadable(earlier * BLOCK_SIZE, o.prompt_tokens) - best)
    ideal = ideal_reuse(conversation(FULL), BLOCK_SIZE)["share"]
    hit = 1 - computed / total
    return {
        "hit_rate": round(hit, 4), "vs_ideal": round(hit / ideal, 3),
        "decisions": dict(Counter(o.decision for o in outcomes)),
        "tokens_lost_by_decision": dict(lost),
        "tokens_not_held_yet_by_decision": dict(late),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="KVAwareSettings fields")  # fmt: skip
    parser.add_argument("--requests", action="store_true", help="one line per request")
    args = parser.parse_args()
    types = {f.name: f.type for f in fields(KVAwareSettings)}
    changes: dict[str, Any] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        changes[key] = None if value == "null" else (float(value) if "float" in str(types[key])
                                                     else int(value))  # fmt: skip
    settings = replace(KVAwareSettings(), **changes)
    outcomes = asyncio.run(simulate(settings, FULL.trace_sec_multiplier))
    if args.requests:
        for o in outcomes:
            print(json.dumps(o.__dict__))
    print(json.dumps(summary(outcomes)))


if __name__ == "__main__":
    main()
