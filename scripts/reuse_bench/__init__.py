"""The KV reuse benchmark's parts, run by scripts/bench_reuse.py.

- settings: the model, the engine's (tight) KV cache, the store and each workload's sizes
- systems: the two systems compared, started as plain ``vllm serve`` instances
- docqa: long-document QA, one request at a time, client-side TTFT
- trace: the conversation trace replayed with ``vllm bench serve`` (timed_trace)
- micro: a lookup that misses, against the real store process; step time, save on/off
- scrape: counters from an instance's /metrics and from the store process
- report, chart: reuse.md and reuse.png, both from reuse.json alone
- run: the phases in order, each system started, measured and torn down
"""
