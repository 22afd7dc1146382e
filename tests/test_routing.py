"""Routing (unit): the pair of instances a request goes to, and what a policy sees."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from pd.proxy.instances import Instance
from pd.proxy.routing import (
    LeastLoaded,
    RoundRobin,
    Route,
    RoutingPolicy,
    RoutingRequest,
    estimate_prompt_tokens,
    make_policy,
)
from pd.proxy.tokenizer import ModelTokenizer


def instances(role: str, n: int) -> list[Instance]:
    return [Instance(f"pd-{role}-{i}", role, url=f"http://h:{i}", healthy=True) for i in range(n)]


def request(prompt: Any = "hello there", tokenizer: Any = None) -> RoutingRequest:
    return RoutingRequest("completions", {"model": "m", "prompt": prompt}, tokenizer)


def route(policy: RoutingPolicy, prefills: list[Instance], decodes: list[Instance]) -> Route:
    return asyncio.run(policy.route(request(), prefills, decodes))


def names(route: Route) -> tuple[str | None, str]:
    return (route.prefill.name if route.prefill else None, route.decode.name)


def test_round_robin_cycles_each_role():
    policy = RoundRobin()
    prefill, decode = instances("prefill", 3), instances("decode", 2)
    assert [names(route(policy, prefill, decode)) for _ in range(4)] == [
        ("pd-prefill-0", "pd-decode-0"),
        ("pd-prefill-1", "pd-decode-1"),
        ("pd-prefill-2", "pd-decode-0"),
        ("pd-prefill-0", "pd-decode-1"),
    ]


def test_round_robin_skips_instances_that_left_rotation():
    policy = RoundRobin()
    prefill, decode = instances("prefill", 3), instances("decode", 1)
    healthy = [prefill[0], prefill[2]]
    assert {names(route(policy, healthy, decode))[0] for _ in range(4)} == {
        "pd-prefill-0", "pd-prefill-2",
    }  # fmt: skip


def test_least_loaded_prefill_by_prompt_tokens_decode_by_requests():
    policy = LeastLoaded()
    prefill = instances("prefill", 2)
    prefill[0].outstanding_prompt_tokens, prefill[0].inflight_requests = 5000, 1
    prefill[1].outstanding_prompt_tokens, prefill[1].inflight_requests = 100, 3
    decode = instances("decode", 2)
    decode[0].inflight_requests, decode[1].inflight_requests = 7, 2
    assert names(route(policy, prefill, decode)) == ("pd-prefill-1", "pd-decode-1")


@pytest.mark.parametrize("policy", [RoundRobin(), LeastLoaded()])
def test_no_prefill_in_rotation_routes_to_decode_alone(policy: RoutingPolicy):
    assert names(route(policy, [], instances("decode", 2)))[0] is None


def test_policies_come_from_the_registry():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")


class CountingTokenizer:
    def __init__(self, ids: list[int] | None) -> None:
        self.ids, self.calls = ids, 0

    async def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        self.calls += 1
        return self.ids


def test_token_ids_are_tokenized_once_on_first_use():
    tokenizer = CountingTokenizer([5, 6, 7])
    routed = request("a prompt of many characters", tokenizer)
    assert routed.prompt_tokens == estimate_prompt_tokens(routed.body)  # nothing asked yet
    assert tokenizer.calls == 0

    async def twice() -> tuple[list[int] | None, list[int] | None]:
        return await routed.token_ids(), await routed.token_ids()

    assert asyncio.run(twice()) == ([5, 6, 7], [5, 6, 7])
    assert tokenizer.calls == 1
    assert routed.prompt_tokens == 3  # counted once known


def test_without_a_tokenizer_there_are_no_token_ids():
    routed = request()
    assert asyncio.run(routed.token_ids()) is None
    assert routed.prompt_tokens == estimate_prompt_tokens(routed.body)


class PrefixAware(RoutingPolicy):
    """A policy of the kind the interface is for: it reads the token ids and chooses
    both instances at once, leaving prefill out when decode holds the prompt."""

    name = "test_prefix_aware"

    def __init__(self, cached_on: dict[str, list[int]]) -> None:
        self.cached_on = cached_on

    async def route(
        self, request: RoutingRequest, prefills: list[Instance], decodes: list[Instance]
    ) -> Route:
        ids = await request.token_ids() or []
        for decode in decodes:
            if ids[: len(self.cached_on.get(decode.name, []))] == self.cached_on.get(decode.name):
                return Route(None, decode)
        return Route(prefills[0] if prefills else None, decodes[-1])


def test_a_policy_sees_token_ids_and_chooses_the_pair():
    prefill, decode = instances("prefill", 1), instances("decode", 2)
    policy = PrefixAware({"pd-decode-0": [1, 2]})
    hit = policy.route(request(tokenizer=CountingTokenizer([1, 2, 3])), prefill, decode)
    miss = policy.route(request(tokenizer=CountingTokenizer([9, 9])), prefill, decode)
    assert names(asyncio.run(hit)) == (None, "pd-decode-0")
    assert names(asyncio.run(miss)) == ("pd-prefill-0", "pd-decode-1")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelTokenizer, Any]:
    """The tiny model's real tokenizer, as vLLM loads it."""
    from transformers import AutoTokenizer

    from pd.models import make_model

    folder = make_model("tiny", tmp_path_factory.mktemp("tiny"))
    return ModelTokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)


def test_model_tokenizer_tokenizes_prompts_and_chats(tiny_tokenizer):
    tokenizer, reference = tiny_tokenizer
    messages = [{"role": "user", "content": "Hi there"}]

    async def ask(endpoint: str, body: dict[str, Any]) -> list[int] | None:
        return await tokenizer.token_ids(endpoint, body)

    assert asyncio.run(ask("completions", {"prompt": "héllo"})) == reference.encode("héllo")
    assert asyncio.run(ask("completions", {"prompt": ["héllo"]})) == reference.encode("héllo")
    assert asyncio.run(ask("completions", {"prompt": [3, 4, 5]})) == [3, 4, 5]
    assert asyncio.run(ask("completions", {"prompt": ["a", "b"]})) is None  # a batch
    assert asyncio.run(ask("completions", {"prompt": [[1, 2], [3]]})) is None  # of ids too
    chat = asyncio.run(ask("chat/completions", {"messages": messages}))
    rendered = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == reference.encode(rendered, add_special_tokens=False)
    assert chat is not None and len(chat) > len("Hi there")  # the template's tokens too


def test_short_prompts_tokenize_on_the_event_loop_long_ones_on_a_thread(tiny_tokenizer):
    from pd.proxy.tokenizer import INLINE_MAX_CHARS

    tokenizer, reference = tiny_tokenizer
    asyncio.run(tokenizer.load())
    loop_thread: list[int] = []
    threads: list[bool] = []  # per call: did it run on the event loop's thread?
    original = tokenizer._tokenize

    def recording(prompt: str | None, body: dict[str, Any]) -> list[int] | None:
        threads.append(threading.get_ident() in loop_thread)
        return original(prompt, body)

    long_text = "x" * (INLINE_MAX_CHARS + 1)
    asks = [
        ("completions", {"prompt": "short"}),
        ("completions", {"prompt": long_text}),
        ("chat/completions", {"messages": [{"role": "user", "content": "short"}]}),
        ("chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        # its tools render into the template: its length does not tell the cost
        ("chat/completions", {"messages": [{"role": "user", "content": "short"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}),
        # content parts: the template's cost is not told by a length either
        ("chat/completions", {"messages": [{"role": "user",
                                            "content": [{"type": "text", "text": "hi"}]}]}),
    ]  # fmt: skip

    async def ask_all() -> list[list[int] | None]:
        loop_thread.append(threading.get_ident())
        return [await tokenizer.token_ids(endpoint, body) for endpoint, body in asks]

    tokenizer._tokenize = recording  # type: ignore[method-assign]
    try:
        ids = asyncio.run(ask_all())
    finally:
        del tokenizer._tokenize
    assert threads == [True, False, True, False, False, False]
    assert ids[0] == reference.encode("short") and ids[1] == reference.encode(long_text)


def test_before_it_has_loaded_every_prompt_tokenizes_on_a_thread(tmp_path):
    tokenizer = ModelTokenizer(str(tmp_path / "not-loaded-yet"))
    ran_on: list[int] = []

    def recording(prompt: str | None, body: dict[str, Any]) -> list[int] | None:
        ran_on.append(threading.get_ident())
        return None

    tokenizer._tokenize = recording  # type: ignore[method-assign]

    async def ask() -> int:
        await tokenizer.token_ids("completions", {"prompt": "short"})
        return threading.get_ident()

    assert asyncio.run(ask()) not in ran_on  # loading holds the GIL: never on the loop


def test_model_tokenizer_that_cannot_load_gives_no_ids(tmp_path):
    tokenizer = ModelTokenizer(str(tmp_path / "no-such-model"))
    assert asyncio.run(tokenizer.token_ids("completions", {"prompt": "hi"})) is None
    assert asyncio.run(tokenizer.token_ids("completions", {"prompt": [1, 2]})) == [1, 2]
