"""What ``routing: kv_aware`` costs the proxy per request, for a 2k-token prompt.

    .venv/bin/python scripts/kv_routing_cost.py [--tokens 2048] [--block-size 32] [--runs 200]

Prints p50/p90 in ms of: tokenizing the prompt (the tiny model's tokenizer, as the
proxy loads it), hashing its full blocks, and the whole ``KVAware.route`` call (an
index of three instances holding part of it), for three kinds of request:

- a text prompt, new each time (tokenized afresh: the route call includes it);
- token ids, new each time (as the benchmark's trace sends them): every block hashed;
- token ids extending the previous request's by one block (a conversation's next
  turn): the blocks hashed before are remembered (``BlockHasher``'s cache).

No engine is started.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from pd.models import make_model
from pd.proxy.block_hashing import BlockHasher
from pd.proxy.instances import Instance
from pd.proxy.kv_index import KVIndex
from pd.proxy.kv_routing import KVAware
from pd.proxy.routing import RoutingRequest
from pd.proxy.tokenizer import ModelTokenizer


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[int(len(ms) * 0.9)]
    return f"p50 {statistics.median(ms):.3f} ms, p90 {p90:.3f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    tokenizer = ModelTokenizer(str(make_model("tiny")))
    rng = random.Random(0)
    words = ["prefill", "decode", "cache", "block", "token", "route", "model", "server"]

    def prompt() -> str:  # the tiny model's tokenizer is byte-level: a token a byte
        text = " ".join(rng.choice(words) for _ in range(args.tokens // 4))
        return text[: args.tokens - 1]

    body = {"prompt": prompt()}
    ids = await tokenizer.token_ids("completions", body)
    assert ids is not None
    print(f"prompt: {len(ids)} tokens, block size {args.block_size}")
    hasher = BlockHasher(args.block_size)
    index = KVIndex()
    hashes = hasher.hashes(ids)
    for i, name in enumerate(("pd-prefill-0", "pd-prefill-1", "pd-decode-0")):
        index.stored(name, hashes[: len(hashes) * i // 3], block_size=args.block_size)
    policy = KVAware(index=index)
    prefills = [Instance(f"pd-prefill-{i}", "prefill", "http://h", healthy=True) for i in (0, 1)]
    decodes = [Instance("pd-decode-0", "decode", "http://h", healthy=True)]

    tokenize, hashing, routing = [], [], []
    for _ in range(args.runs):
        body = {"prompt": prompt()}
        t0 = time.perf_counter()
        ids = await tokenizer.token_ids("completions", body)
        t1 = time.perf_counter()
        BlockHasher(args.block_size).hashes(ids or [])  # a fresh hasher: nothing remembered
        t2 = time.perf_counter()
        await policy.route(RoutingRequest("completions", body, tokenizer), prefills, decodes)
        t3 = time.perf_counter()
        tokenize.append(t1 - t0)
        hashing.append(t2 - t1)
        routing.append(t3 - t2)
    print(f"tokenize (in a worker thread): {percentiles(tokenize)}")
    print(f"hash {len(ids or []) // args.block_size} new blocks: {percentiles(hashing)}")
    print(f"KVAware.route, a text prompt, tokenizing included: {percentiles(routing)}")

    async def route_ids(token_ids: list[int]) -> float:
        t0 = time.perf_counter()
        routed = RoutingRequest("completions", {"prompt": token_ids}, tokenizer)
        await policy.route(routed, prefills, decodes)
        return time.perf_counter() - t0

    def new_ids() -> list[int]:
        return [rng.randrange(32_000) for _ in range(args.tokens)]

    fresh = [await route_ids(new_ids()) for _ in range(args.runs)]
    print(f"KVAware.route, {args.tokens} new token ids: {percentiles(fresh)}")
    turn = new_ids()[: args.tokens - args.block_size]
    following = []
    for _ in range(args.runs):
        turn = turn[: args.tokens - args.block_size] + new_ids()[: args.block_size]
        following.append(await route_ids(turn))
    print(f"KVAware.route, {args.tokens} token ids, all but the last block as the previous "
          f"request's: {percentiles(following)}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
