"""Unit tests of the first-token flow's parts (pd.proxy.first_token): which requests
qualify, reading the prefill answer, the decode leg's body, and the rewriting of
decode's stream. The flow end to end: tests/test_serve_first_token.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pd.decode.scheduler_side import DecodeScheduler
from pd.proxy.first_token import Continuation, FirstToken, qualifies

STREAM = {"model": "m", "prompt": "hello", "stream": True, "max_tokens": 8}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize(
    "change",
    [{}, {"temperature": 0.7, "top_p": 0.9}, {"prompt": [1, 2, 3]}, {"max_tokens": 2},
     {"stream_options": {"include_usage": True}}, {"logprobs": None}, {"stop": []},
     {"presence_penalty": 0, "repetition_penalty": 1}, {"min_tokens": 3}],
)  # fmt: skip
def test_plain_streamed_completions_qualify(change):
    assert qualifies("completions", {**STREAM, **change}, chat_output_parsed=False)


@pytest.mark.parametrize(
    "change",
    [{"stream": False}, {"n": 2}, {"echo": True}, {"logprobs": 2}, {"stop": ["\n"]},
     {"seed": 1}, {"presence_penalty": 0.5}, {"repetition_penalty": 1.1},
     {"max_tokens": 1}, {"prompt": ["a", "b"]}, {"prompt": [[1, 2], [3]]},
     {"stream_options": {"continuous_usage_stats": True}},
     {"response_format": {"type": "json_object"}}, {"use_beam_search": True},
     {"return_token_ids": True}],
)  # fmt: skip
def test_requests_whose_answer_would_change_do_not_qualify(change):
    assert not qualifies("completions", {**STREAM, **change}, chat_output_parsed=False)


def test_chat_qualifies_unless_the_server_parses_its_output():
    assert qualifies("chat/completions", CHAT, chat_output_parsed=False)
    assert not qualifies("chat/completions", CHAT, chat_output_parsed=True)
    assert not qualifies("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, False)
    assert not qualifies("chat/completions", {**CHAT, "max_completion_tokens": 1}, False)
    parts = [{"type": "text", "text": "hi"}]
    assert qualifies("chat/completions", {**CHAT, "messages": [{"role": "user", "content": parts}]},
                     chat_output_parsed=False)  # fmt: skip
    image = [*parts, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert not qualifies("chat/completions", {**CHAT, "messages": [{"role": "user",
                         "content": image}]}, chat_output_parsed=False)  # fmt: skip
    # Completions have no chat output to parse.
    assert qualifies("completions", STREAM, chat_output_parsed=True)


def completion_answer(text="Hi", finish="length", token_ids=(42,)) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish,
              "token_ids": list(token_ids), "prompt_token_ids": [1, 2, 3]}  # fmt: skip
    return {"id": "cmpl-1", "created": 7, "model": "m", "choices": [choice]}


def chat_answer(content="Hi") -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": "length", "token_ids": [42]}  # fmt: skip
    return {"id": "chatcmpl-1", "created": 7, "model": "m", "choices": [choice],
            "prompt_token_ids": [5, 6]}  # fmt: skip


def test_first_token_read_from_answers():
    first = FirstToken.from_answer("completions", completion_answer())
    assert (first.id, first.text, first.token_id, first.prompt_token_ids) == (
        "cmpl-1", "Hi", 42, [1, 2, 3])  # fmt: skip
    chat = FirstToken.from_answer("chat/completions", chat_answer())
    assert (chat.text, chat.token_id, chat.prompt_token_ids) == ("Hi", 42, [5, 6])


@pytest.mark.parametrize(
    "answer",
    [completion_answer(finish="stop"),  # EOS: decode must end the same way
     completion_answer(token_ids=(1, 2)),
     completion_answer(text=None),
     {"id": "x", "choices": []}],
)  # fmt: skip
def test_answers_that_cannot_be_continued(answer):
    assert FirstToken.from_answer("completions", answer) is None


@pytest.mark.parametrize(("text", "whole"), [("Hi", True), ("", False), ("\ufffdA", False)])
def test_a_token_inside_a_character_is_continued_with_the_proxys_text(text, whole):
    first = FirstToken.from_answer("completions", completion_answer(text=text))
    assert first is not None and first.text_is_whole is whole


def leg(endpoint: str, body: dict) -> SimpleNamespace:
    return SimpleNamespace(endpoint=endpoint, body=body)


def test_continuation_bodies():
    params = {"do_remote_prefill": True, "remote_num_tokens": 3}
    first = FirstToken.from_answer("completions", completion_answer())
    body = first.continuation(leg("completions", {**STREAM, "min_tokens": 3}), params)
    assert body["prompt"] == [1, 2, 3, 42] and "return_token_ids" not in body
    assert first.continuation(leg("completions", STREAM), params, token_ids=True)[
        "return_token_ids"] is True  # fmt: skip
    assert (body["max_tokens"], body["min_tokens"]) == (7, 2)
    assert body["kv_transfer_params"] == params
    # vLLM's completions default is 16 tokens: 15 are left.
    default = first.continuation(leg("completions", {"prompt": "x", "stream": True}), params)
    assert default["max_tokens"] == 15

    chat = FirstToken.from_answer("chat/completions", chat_answer())
    body = chat.continuation(leg("chat/completions", {**CHAT, "max_completion_tokens": 5}), params)
    assert body["messages"] == CHAT["messages"]
    assert body["kv_transfer_params"]["prompt_token_ids"] == [5, 6, 42]
    assert body["max_completion_tokens"] == 4 and "max_tokens" not in body
    assert "prompt_token_ids" not in params  # the caller's dict is left alone
    unbounded = chat.continuation(leg("chat/completions", CHAT), params)
    assert "max_tokens" not in unbounded  # vLLM's default: the rest of the context


def events(data: bytes) -> list:
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[len(b"data: ") :]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def test_opening_events_are_valid_chunks():
    chat = FirstToken.from_answer("chat/completions", chat_answer())
    opening = events(chat.opening_events("chat/completions"))
    assert [e["choices"][0]["delta"] for e in opening] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}]  # fmt: skip
    assert {e["id"] for e in opening} == {"chatcmpl-1"}
    first = FirstToken.from_answer("completions", completion_answer())
    (only,) = events(first.opening_events("completions"))
    assert only["choices"][0]["text"] == "Hi" and only["object"] == "text_completion"


def test_continuation_rewrites_decode_stream_split_anywhere():
    chat = FirstToken.from_answer("chat/completions", chat_answer())
    decode = (
        b'data: {"id":"chatcmpl-d","choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":""},"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-d","choices":[{"index":0,"delta":{"content":" there"},'
        b'"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-d","choices":[{"index":0,"delta":{"content":"!"},'
        b'"finish_reason":"length"}]}\n\n'
        b'data: {"id":"chatcmpl-d","choices":[],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":4,"total_tokens":7}}\n\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 7, len(decode)):
        rewriter = Continuation(chat)
        out = b"".join(rewriter.feed(decode[i : i + size]) for i in range(0, len(decode), size))
        got = events(out)
        assert got[-1] == "[DONE]"
        chunks = got[:-1]
        assert {c["id"] for c in chunks} == {"chatcmpl-1"}
        assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
            {"content": " there"}, {"content": "!"}]  # fmt: skip
        assert chunks[2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5,
                                      "total_tokens": 7}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from pd.models import make_model

    return AutoTokenizer.from_pretrained(make_model("tiny"))


def completion_chunk(token_ids: list[int], finish: str | None = None, **extra) -> bytes:
    choice = {"index": 0, "text": "(decode's text)", "finish_reason": finish,
              "token_ids": token_ids, "prompt_token_ids": None, **extra}  # fmt: skip
    return b"data: " + json.dumps({"id": "cmpl-d", "choices": [choice]}).encode() + b"\n\n"


def test_continuation_writes_the_text_a_single_instance_would(tiny_tokenizer):
    """A first token inside a character (byte-level ids 0xC3 0xA9 are "é"): the
    proxy's text, token by token, is what one DecodeStream over the whole answer writes
    (vLLM's detokenizer), and decode's own text and token ids do not reach the client."""
    from tokenizers.decoders import DecodeStream

    from pd.proxy.tokenizer import TextStream

    prompt, answer = list(b"Say it:"), [0xC3, 0xA9, *b" ok", 0xE2, 0x82, 0xAC, 257]
    backend = tiny_tokenizer._tokenizer
    oracle = DecodeStream(ids=prompt, skip_special_tokens=True)
    want = [oracle.step(backend, t) or "" for t in answer[:-1]]  # the EOS adds nothing

    first = FirstToken.from_answer("completions", completion_answer(text="", token_ids=(0xC3,)))
    text = TextStream(backend, prompt, skip_special_tokens=True)
    assert text.text([first.token_id]) == want[0] == ""
    rewriter = Continuation(first, text)
    decode = b"".join(completion_chunk([t]) for t in answer[1:-1])
    decode += completion_chunk([answer[-1]], finish="stop", stop_reason=None)
    got = events(rewriter.feed(decode + b"data: [DONE]\n\n"))
    assert [c["choices"][0]["text"] for c in got[:-1]] == [*want[1:], ""]
    assert all(c["choices"][0]["token_ids"] is None for c in got[:-1])
    assert "".join(want) == "é ok€"


def test_continuation_writes_chat_content_and_drops_decodes_opening(tiny_tokenizer):
    from pd.proxy.tokenizer import TextStream

    chat = FirstToken.from_answer("chat/completions", chat_answer(content=""))
    text = TextStream(tiny_tokenizer._tokenizer, [5, 6], skip_special_tokens=True)
    text.text([0xC3])
    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    decoded = {"index": 0, "delta": {"content": "x"}, "finish_reason": None, "token_ids": [0xA9]}
    ended = {"index": 0, "delta": {}, "finish_reason": "length", "token_ids": [65]}
    stream = b"".join(b"data: " + json.dumps({"id": "d", "choices": [c], "prompt_token_ids":
                      [5, 6]}).encode() + b"\n\n" for c in (opening, decoded, ended))  # fmt: skip
    got = events(Continuation(chat, text).feed(stream))
    assert [c["choices"][0]["delta"] for c in got] == [{"content": "é"}, {"content": "A"}]
    assert all(c["prompt_token_ids"] is None for c in got)


def test_continuation_passes_errors_through():
    first = FirstToken.from_answer("completions", completion_answer())
    error = b'data: {"error":{"message":"boom","code":500}}\n\n'
    assert Continuation(first).feed(error) == error


def test_decode_loads_only_the_tokens_prefill_computed():
    """A prompt one token longer than prefill's (the first-token flow) pulls the KV of
    prefill's tokens only; decode computes the last one."""
    scheduler = DecodeScheduler()

    def request(num_prompt: int, **params) -> SimpleNamespace:
        params = {"do_remote_prefill": True, **params}
        return SimpleNamespace(prompt_token_ids=list(range(num_prompt)), kv_transfer_params=params)

    assert scheduler.get_num_new_matched_tokens(request(129, remote_num_tokens=128), 0) == (
        128, True)  # fmt: skip
    assert scheduler.get_num_new_matched_tokens(request(129, remote_num_tokens=128), 128) == (
        0, False)  # fmt: skip
    # The whole prompt when prefill computed all of it (vLLM recomputes the last one).
    assert scheduler.get_num_new_matched_tokens(request(128, remote_num_tokens=128), 0) == (
        128, True)  # fmt: skip
    assert scheduler.get_num_new_matched_tokens(request(40), 16) == (24, True)
