"""The KV-aware routing benchmark's parts, run by scripts/bench_routing.py.

- settings: the model, block size, cluster shapes and each workload's sizes
- workloads: the conversation trace, the generated shared-prefix trace, their ideal reuse
- systems: each routing policy as a pd-serve config; the counters read around a workload
- replay: ``vllm bench serve --dataset-name timed_trace`` against a system
- report, chart: routing.md and routing.png, both from routing.json alone
- run: each system and workload in turn, started, measured and torn down
- pool: repeated runs of a system on a workload as one row
"""
