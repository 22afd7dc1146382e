"""2 prefill + 1 decode on a 2-CPU machine, out of the box, with a KV cache below 1 GiB.

configs/local.yaml's ``cpus: auto`` gives the three instances fractional shares of the
machine's CPUs, so Ray places all of them; ``cpu_kv_cache_gib: 0.05`` reaches vLLM as
bytes and each instance's cache has the blocks that size buys with the tiny model.
"""

from __future__ import annotations

import re

import httpx
import pytest
from openai import OpenAI

from pd.models import PRESETS
from pd.serve_process import PdServeProcess, local_config

pytestmark = pytest.mark.engines

KV_GIB = 0.05
SMALL_MACHINE = local_config(
    {
        "prefill": {"instances": 2, "resources": {"cpu_kv_cache_gib": KV_GIB}},
        "decode": {"resources": {"cpu_kv_cache_gib": KV_GIB}},
    }
)


@pytest.fixture(scope="module")
def serve():
    serve = PdServeProcess(SMALL_MACHINE).start()
    try:
        yield serve.wait_ready(timeout_s=600)
    finally:
        serve.stop()


def test_all_three_instances_start_with_fractional_cpus(serve):
    assert set(serve.instances()) == {"pd-prefill-0", "pd-prefill-1", "pd-decode-0"}
    log = serve.log()
    assert "instances share cores" in log  # the core-sharing warning stays


def test_each_kv_cache_has_the_blocks_its_size_buys(serve):
    tiny = PRESETS["tiny"]
    # configs/local.yaml runs it in float32 (the preset's dtype).
    bytes_per_token = tiny.kv_bytes_per_token
    for name, instance in serve.instances().items():
        text = httpx.get(f"{instance.url}/metrics", timeout=10).text
        info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
        block_size = int(re.search(r'block_size="(\d+)"', info).group(1))
        blocks = int(re.search(r'num_gpu_blocks="(\d+)"', info).group(1))
        assert blocks == int(KV_GIB * 2**30) // (bytes_per_token * block_size), (name, info)


def test_it_serves_through_the_proxy(serve):
    client = OpenAI(base_url=f"{serve.url}/v1", api_key="unused")
    for _ in range(3):  # round robin: both prefill instances take a turn
        out = client.completions.create(
            model="pd-tiny", prompt="Small caches are for testing. " * 8, max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text and out.usage.completion_tokens == 8
