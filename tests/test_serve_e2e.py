"""pd-serve end to end: configs/local.yaml on real Ray, real vLLM, the official client.

One pd-serve process (as a user starts it; the session's ``local_cluster``) serves the
whole module; its greedy answers must equal a single plain vLLM instance's. The last
test stops it with SIGTERM and checks that nothing it started is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterable

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from pd.serve_process import PdServeProcess
from pd.vllm_server import parse_prometheus
from tests.harness.openai_api import (
    GREEDY,
    MESSAGES,
    PROMPT,
    SERVED,
    client_of,
    grew,
    proxy_metrics,
)
from tests.harness.ray_driver import actor_infos
from tests.harness.waiting import wait_for

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def serve(local_cluster) -> PdServeProcess:
    return local_cluster


@pytest.fixture(scope="module")
def client(serve) -> OpenAI:
    return client_of(serve)


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
    assert grew(before, after, 'pd_kv_transfers{instance="pd-decode-0",role="decode"}') == 3
    assert grew(before, after, 'pd_kv_bytes_received{instance="pd-decode-0",role="decode"}') > 0
    assert grew(before, after, 'pd_kv_bytes_sent{instance="pd-prefill-0",role="prefill"}') > 0
    assert grew(before, after, 'pd_requests_total{endpoint="completions",status="200"}') == 3
    assert after['pd_kv_transfer_failures{instance="pd-decode-0",role="decode"}'] == 0
    assert grew(before, after, "pd_prefill_fallbacks_total") == 0


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


# --- bad input: each answered with a 4xx in OpenAI's format; the proxy keeps serving ---

JSON = {"Content-Type": "application/json"}
OK_BODY = {"model": SERVED, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": SERVED, "messages": MESSAGES, "max_tokens": 2}


def _body(base: dict, **changes) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


# (id, method, path, httpx arguments, status, param)
BAD_REQUESTS = [
    ("malformed-json", "POST", "/v1/completions",
     {"content": b'{"model": "pd-tiny", "prompt": ', "headers": JSON}, 400, None),
    ("wrong-content-type", "POST", "/v1/completions",
     {"content": json.dumps(OK_BODY), "headers": {"Content-Type": "text/plain"}}, 415, None),
    ("missing-model", "POST", "/v1/completions", {"json": _body(OK_BODY, model=...)}, 400, "model"),
    ("missing-prompt", "POST", "/v1/completions", {"json": _body(OK_BODY, prompt=...)}, 400,
     "prompt"),
    ("missing-messages", "POST", "/v1/chat/completions", {"json": _body(OK_CHAT, messages=...)},
     400, "messages"),
    ("prompt-not-text", "POST", "/v1/completions", {"json": _body(OK_BODY, prompt=5)}, 400,
     "prompt"),
    ("max-tokens-a-string", "POST", "/v1/completions", {"json": _body(OK_BODY, max_tokens="16")},
     400, "max_tokens"),
    ("stream-a-string", "POST", "/v1/completions", {"json": _body(OK_BODY, stream="yes")}, 400,
     "stream"),
    ("messages-a-string", "POST", "/v1/chat/completions", {"json": _body(OK_CHAT, messages="Hi")},
     400, "messages"),
    ("message-without-role", "POST", "/v1/chat/completions",
     {"json": _body(OK_CHAT, messages=[{"content": "Hi"}])}, 400, "messages[0].role"),
    ("max-tokens-zero", "POST", "/v1/completions", {"json": _body(OK_BODY, max_tokens=0)}, 400,
     "max_tokens"),
    ("max-tokens-negative", "POST", "/v1/chat/completions",
     {"json": _body(OK_CHAT, max_tokens=-5)}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "POST", "/v1/completions",
     {"json": _body(OK_BODY, max_tokens=100_000)}, 400, "max_tokens"),
    ("max-completion-tokens-beyond-context", "POST", "/v1/chat/completions",
     {"json": _body(OK_CHAT, max_completion_tokens=4096)}, 400, "max_completion_tokens"),
    ("n-above-limit", "POST", "/v1/completions", {"json": _body(OK_BODY, n=17)}, 400, "n"),
    ("n-above-limit-streamed", "POST", "/v1/chat/completions",
     {"json": _body(OK_CHAT, n=17, stream=True)}, 400, "n"),
    ("temperature-negative", "POST", "/v1/completions",
     {"json": _body(OK_BODY, temperature=-1)}, 400, "temperature"),
    ("temperature-above-2", "POST", "/v1/chat/completions",
     {"json": _body(OK_CHAT, temperature=2.5)}, 400, "temperature"),
    ("top-p-zero", "POST", "/v1/completions", {"json": _body(OK_BODY, top_p=0)}, 400, "top_p"),
    ("top-p-above-1", "POST", "/v1/completions", {"json": _body(OK_BODY, top_p=1.5)}, 400,
     "top_p"),
    ("empty-messages", "POST", "/v1/chat/completions", {"json": _body(OK_CHAT, messages=[])},
     400, "messages"),
    ("invalid-utf8", "POST", "/v1/completions",
     {"content": b'{"model": "pd-tiny", "prompt": "\xff\xfe"}', "headers": JSON}, 400, None),
    ("lone-surrogate", "POST", "/v1/completions",
     {"content": b'{"model": "pd-tiny", "prompt": "\\ud800"}', "headers": JSON}, 400, None),
    ("nan", "POST", "/v1/completions",
     {"content": b'{"model": "pd-tiny", "prompt": "x", "top_k": NaN}', "headers": JSON}, 400,
     None),
    ("unknown-model", "POST", "/v1/completions", {"json": _body(OK_BODY, model="gpt-9")}, 404,
     "model"),
    ("unknown-path", "POST", "/v1/embeddings", {"json": OK_BODY}, 404, None),
    ("unknown-path-outside-v1", "GET", "/admin", {}, 404, None),
    ("wrong-method", "GET", "/v1/completions", {}, 405, None),
]  # fmt: skip


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"]
    return error


def assert_still_serves(client: OpenAI) -> None:
    reply = client.completions.create(model=SERVED, prompt="Hello", max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_is_a_4xx_in_openai_format(serve, client, method, path, kwargs, status, param):
    response = httpx.request(method, f"{serve.url}{path}", timeout=30, **kwargs)
    error = assert_openai_error(response, status)
    assert error["param"] == param, error
    if status == 405:
        assert response.headers["allow"] == "POST"
    assert_still_serves(client)


def test_bad_requests_through_the_official_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED, messages=[], max_tokens=2)
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED, prompt="x", n=17)
    assert info.value.param == "n"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="x")
    assert info.value.param == "model"
    assert_still_serves(client)


def test_prompt_longer_than_the_context_is_vllms_400_relayed(serve, client):
    """The prefill leg's vLLM rejects it; the proxy relays that answer byte for byte."""
    prefill_url = serve.instances()["pd-prefill-0"].url
    long_prompt = "prefill " * 3000  # well over max_model_len (2048) tokens
    for endpoint, body in (
        ("completions", {"model": SERVED, "prompt": long_prompt, "max_tokens": 1}),
        ("chat/completions", {"model": SERVED, "max_tokens": 1,
                              "messages": [{"role": "user", "content": long_prompt}]}),
    ):  # fmt: skip
        ours = httpx.post(f"{serve.url}/v1/{endpoint}", json=body, timeout=60)
        theirs = httpx.post(f"{prefill_url}/v1/{endpoint}", json=body, timeout=60)
        assert theirs.status_code == 400, theirs.text
        assert (ours.status_code, ours.content) == (400, theirs.content)
        assert "context length" in assert_openai_error(ours, 400)["message"]
    assert_still_serves(client)


def _raw_http(serve: PdServeProcess, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, dict]:
    """Send a request byte by byte (httpx would refuse to lie about Content-Length)."""
    with socket.create_connection(("127.0.0.1", serve.port), timeout=60) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        header, _, body = received.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(fields["content-length"]):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_body_over_the_limit_is_413(serve, client):
    limit = 32 * 1024 * 1024  # proxy.max_body_bytes' default
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n").encode()  # fmt: skip
    status, body = _raw_http(serve, head)  # answered before any of the body is sent
    assert status == 413 and body["error"]["code"] == 413

    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    mib = b'{"prompt": "' + b"x" * (1024 * 1024 - 12)
    chunks = [mib] + [b"x" * 1024 * 1024] * 31 + [b"x"]  # limit + 1 bytes
    framed = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
    status, body = _raw_http(serve, head, framed)
    assert status == 413 and body["error"]["code"] == 413
    assert_still_serves(client)


def test_client_kv_transfer_params_are_ignored(serve, client):
    """A client cannot point decode at a host and port of its choosing."""
    with socket.create_server(("127.0.0.1", 0)) as trap:
        port = trap.getsockname()[1]
        forged = {
            "do_remote_prefill": True,
            "remote_engine_id": "forged",
            "remote_request_id": "forged",
            "remote_host": "127.0.0.1",
            "remote_port": port,
            "remote_ports": [port],
            "remote_block_ids": [0, 1, 2, 3],
        }
        greedy = {**GREEDY, "extra_body": {"ignore_eos": True, "kv_transfer_params": forged}}
        ours = client.completions.create(model=SERVED, prompt=PROMPT, **greedy)
        expected = client.completions.create(model=SERVED, prompt=PROMPT, **GREEDY)
        assert ours.choices[0].text == expected.choices[0].text
        chat = client.chat.completions.create(
            model=SERVED, messages=MESSAGES, stream=True, **greedy
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        expected = client.chat.completions.create(model=SERVED, messages=MESSAGES, **GREEDY)
        assert streamed == expected.choices[0].message.content
        trap.settimeout(1)
        with pytest.raises(TimeoutError):
            trap.accept()  # nobody came


def test_named_actors_exist_in_ray(serve):
    infos = actor_infos(serve)
    for name in ("pd-prefill-0", "pd-decode-0"):
        assert infos[name]["state"] == "ready"
        assert infos[name]["url"].startswith("http://127.0.0.1:")


def test_engines_run_at_normal_priority(serve):
    """Ray starts its workers at niceness 15; vLLM inherits it unless pd undoes it."""
    for name, info in actor_infos(serve).items():
        assert info["niceness"] == 0, name
        server = psutil.Process(info["pid"])
        processes = [server.parent(), server, *server.children(recursive=True)]
        assert len(processes) >= 3, f"{name}: no engine processes under {server}"
        for proc in processes:
            assert proc.nice() == 0, f"{name}: {proc.name()} runs at niceness {proc.nice()}"


def test_crashed_instance_restarts_and_rejoins(serve, client):
    before = actor_infos(serve)["pd-decode-0"]
    os.killpg(before["pid"], signal.SIGKILL)  # vLLM crashes; its actor must come back

    def decode_count() -> int:
        return httpx.get(f"{serve.url}/health", timeout=10).json()["decode"]

    assert wait_for(lambda: decode_count() == 0, 30), "crashed decode stayed in rotation"
    assert wait_for(lambda: decode_count() == 1, 420, 2), f"decode did not rejoin:\n{serve.log()}"
    after = actor_infos(serve)["pd-decode-0"]
    assert after["url"] != before["url"] and after["state"] == "ready"
    reply = client.completions.create(model=SERVED, prompt=PROMPT, **GREEDY)
    assert reply.usage.completion_tokens == 16


def test_client_disconnect_aborts_the_request(serve, client):
    decode_url = serve.instances()["pd-decode-0"].url

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
    assert wait_for(lambda: decode_metric("vllm:num_requests_running") <= 0, 30, 0.2), (
        "decode kept running the abandoned request"
    )
    assert decode_metric("vllm:generation_tokens_total") - generated_before < 1500


def test_sigterm_stops_everything(serve):
    instance_urls = [instance.url for instance in serve.instances().values()]
    assert serve.stop(signal.SIGTERM) == 0, serve.log()
    for url in [serve.url, *instance_urls]:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    running = subprocess.run(
        ["pgrep", "-af", "raylet|gcs_server|served-model-name pd-tiny"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    # Only this test's own processes: other pd clusters may run on the machine.
    ports = [f"--port {url.rsplit(':', 1)[1]} " for url in instance_urls]
    leftovers = [
        line for line in running.splitlines()
        if serve.ray_tmpdir in line or any(port in f"{line} " for port in ports)
    ]  # fmt: skip
    assert leftovers == [], leftovers
