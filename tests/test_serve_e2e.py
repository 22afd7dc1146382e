"""pd-serve end to end: configs/local.yaml on real Ray, real vLLM, the official client.

One pd-serve process (as a user starts it) serves the whole module; its greedy
answers must equal a single plain vLLM instance's. The last test stops it with
SIGTERM and checks that nothing it started is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pd.vllm_server import free_port, parse_prometheus

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parents[1]
SERVED = "pd-tiny"
PROMPT = "Disaggregated serving splits prefill from decode. " * 6


class PdServe:
    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="pd-serve-test-")) / "pd-serve.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [Path(sys.executable).with_name("pd-serve"), "--config", str(config),
             "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 600) -> PdServe:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"pd-serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        pytest.fail(f"pd-serve not ready in {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout_s: float = 120) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def serve():
    server = PdServe(REPO / "configs" / "local.yaml")
    try:
        yield server.wait_ready()
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def client(serve) -> OpenAI:
    return OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(reference_server, tiny_model) -> tuple[OpenAI, str]:
    return OpenAI(base_url=f"{reference_server.url}/v1", api_key="unused"), str(tiny_model)


def proxy_metrics(serve: PdServe) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{serve.url}/metrics", timeout=10).text)


GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode."}]


def test_completions_equal_single_instance(serve, client, reference):
    ref_client, ref_model = reference
    extra = {"ignore_eos": True, "return_token_ids": True}
    ours = client.completions.create(model=SERVED, prompt=PROMPT, **{**GREEDY, "extra_body": extra})
    theirs = ref_client.completions.create(
        model=ref_model, prompt=PROMPT, **{**GREEDY, "extra_body": extra}
    )
    ours_ids = ours.model_dump()["choices"][0]["token_ids"]
    assert ours_ids == theirs.model_dump()["choices"][0]["token_ids"]
    assert len(ours_ids) == 16
    assert ours.model == SERVED


def test_chat_equal_single_instance(client, reference):
    ref_client, ref_model = reference
    ours = client.chat.completions.create(model=SERVED, messages=MESSAGES, **GREEDY)
    theirs = ref_client.chat.completions.create(model=ref_model, messages=MESSAGES, **GREEDY)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.completion_tokens == 16


def test_streaming_equals_single_instance(client, reference):
    ref_client, ref_model = reference
    chat = client.chat.completions.create(model=SERVED, messages=MESSAGES, stream=True, **GREEDY)
    streamed = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    expected = ref_client.chat.completions.create(model=ref_model, messages=MESSAGES, **GREEDY)
    assert streamed == expected.choices[0].message.content

    text = client.completions.create(model=SERVED, prompt=PROMPT, stream=True, **GREEDY)
    streamed = "".join(c.choices[0].text for c in text)
    expected = ref_client.completions.create(model=ref_model, prompt=PROMPT, **GREEDY)
    assert streamed == expected.choices[0].text


def test_kv_really_moved_over_the_transfer_layer(serve, client):
    before = proxy_metrics(serve)
    for _ in range(3):
        client.completions.create(model=SERVED, prompt=PROMPT, **GREEDY)
    after = proxy_metrics(serve)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('pd_kv_transfers{instance="pd-decode-0",role="decode"}') == 3
    assert grew('pd_kv_bytes_received{instance="pd-decode-0",role="decode"}') > 0
    assert grew('pd_kv_bytes_sent{instance="pd-prefill-0",role="prefill"}') > 0
    assert grew('pd_requests_total{endpoint="completions",status="200"}') == 3
    assert after['pd_kv_transfer_failures{instance="pd-decode-0",role="decode"}'] == 0
    assert grew("pd_prefill_fallbacks_total") == 0


def test_models_health_and_metrics_endpoints(serve, client):
    assert [m.id for m in client.models.list().data] == [SERVED]
    health = httpx.get(f"{serve.url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "prefill": 1, "decode": 1}
    metrics = proxy_metrics(serve)
    for name in (
        "pd_e2e_request_latency_seconds_count",
        "pd_time_to_first_token_seconds_count",
        "pd_inter_token_latency_seconds_count",
        'pd_instance_healthy{instance="pd-prefill-0",role="prefill"}',
        'pd_instance_inflight_requests{instance="pd-decode-0",role="decode"}',
    ):
        assert name in metrics
    assert metrics["pd_time_to_first_token_seconds_count"] >= 2  # the streamed requests


def test_unknown_model_is_a_404_in_openai_format(serve):
    response = httpx.post(
        f"{serve.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=30
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def actor_infos() -> dict[str, dict]:
    """Ask Ray (as a separate driver) for each instance actor's state, URL and pid."""
    script = (
        "import json, ray\n"
        "ray.init(address='auto', namespace='pd', logging_level='ERROR')\n"
        "infos = {}\n"
        "for name in ('pd-prefill-0', 'pd-decode-0'):\n"
        "    info = ray.get(ray.get_actor(name).info.remote())\n"
        "    infos[name] = {'state': info.state, 'url': info.url, 'pid': info.pid}\n"
        "print(json.dumps(infos))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_named_actors_exist_in_ray(serve):
    infos = actor_infos()
    for name in ("pd-prefill-0", "pd-decode-0"):
        assert infos[name]["state"] == "ready"
        assert infos[name]["url"].startswith("http://127.0.0.1:")


def test_crashed_instance_restarts_and_rejoins(serve, client):
    before = actor_infos()["pd-decode-0"]
    os.killpg(before["pid"], signal.SIGKILL)  # vLLM crashes; its actor must come back

    def decode_count() -> int:
        return httpx.get(f"{serve.url}/health", timeout=10).json()["decode"]

    deadline = time.monotonic() + 30
    while decode_count() != 0:
        assert time.monotonic() < deadline, "crashed decode stayed in rotation"
        time.sleep(0.5)
    deadline = time.monotonic() + 420
    while decode_count() != 1:
        assert time.monotonic() < deadline, f"decode did not rejoin:\n{serve.log()}"
        time.sleep(2)
    after = actor_infos()["pd-decode-0"]
    assert after["url"] != before["url"] and after["state"] == "ready"
    reply = client.completions.create(model=SERVED, prompt=PROMPT, **GREEDY)
    assert reply.usage.completion_tokens == 16


def test_client_disconnect_aborts_the_request(serve, client):
    decode_url = actor_infos()["pd-decode-0"]["url"]

    def decode_metric(name: str) -> float:
        text = httpx.get(f"{decode_url}/metrics", timeout=10).text
        return parse_prometheus(text).get(name, 0.0)

    generated_before = decode_metric("vllm:generation_tokens_total")
    stream = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=1500, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))  # the request is decoding now
    stream.close()  # the client goes away
    deadline = time.monotonic() + 30
    while decode_metric("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "decode kept running the abandoned request"
        time.sleep(0.2)
    assert decode_metric("vllm:generation_tokens_total") - generated_before < 1500


def test_sigterm_stops_everything(serve):
    instance_urls = [info["url"] for info in actor_infos().values()]
    assert serve.terminate() == 0, serve.log()
    for url in [serve.url, *instance_urls]:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    leftovers = subprocess.run(
        ["pgrep", "-af", "raylet|gcs_server|served-model-name pd-tiny"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert leftovers == "", leftovers
