"""What the tests share, so that no test module imports another.

    clusters.py       pd-serve clusters, one running at a time, shared by config
    vllm.py           single vLLM servers with test defaults (pd's VllmServer)
    openai_api.py     the requests, clients and metric readings of the pd-serve tests
    ray_driver.py     a second Ray driver: a cluster's actors' info, ray.kill, restarts
    waiting.py        bounded polling
    kv_layouts.py     small vLLM-shaped KV caches for transport tests
    fake_upstream.py  fake vLLM instances for engine-free proxy tests
    engine_guard.py   the plugin that keeps engines out of tests not marked `engines`

The pd-serve launcher is pd.serve_process; the fault and load scenarios, their client
and outcome checks are scripts/scenarios (scripts must not import tests).
"""
