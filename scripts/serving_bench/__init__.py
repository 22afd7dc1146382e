"""The serving benchmark's parts, run by scripts/bench_serving.py.

- settings: the model, engine arguments and workloads every system gets
- systems: the systems compared (one vLLM instance, pd-serve, stock vLLM P/D)
- load: drives a system with ``vllm bench serve`` and records where the CPU went
- scrape: reads the Prometheus metrics of pd's proxy and of vLLM instances
- overhead: one request at a time, pd's TTFT against its prefill instance's own time
- report, chart: serving.md and serving.png, both from the results alone
- run: starts each system in turn, measures it, tears it down
"""
