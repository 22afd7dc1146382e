"""The first-token flow: a streamed request's first token leaves with the prefill answer.

The prefill leg computes the prompt and samples one token (``max_tokens: 1``). The
sequential flow drops that token, and decode computes it again after pulling the KV,
so the client's first token waits for a second HTTP hop, the KV pull and a decode
step. Here the proxy streams the prefill leg's token to the client at once and sends
decode the prompt's token ids plus that token, with one token less to generate:
decode pulls the prompt's KV (``remote_num_tokens`` tells its connector how much
there is) and its first step computes the second token. Greedy output is the single
instance's, token for token, and the time to first token is the prefill instance's.

Only requests whose answer does not change when the first token moves into the
prompt take this way (``qualifies``); the others go sequentially. So does a request
whose first token ended it: decode must see it end the same way.

A first token that is part of a character (byte-level tokenizers) has no text yet,
and vLLM's detokenizer, primed with a prompt that ends inside a character, would send
the whole prompt's text along with the second token. For those the proxy writes the
text itself: decode returns its token ids, and a DecodeStream primed with the prompt
(what vLLM's own detokenizer is) turns them into text, the first token's included,
exactly as a single instance would have. The opening event then has no text, as
vLLM's own stream has for such a token.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from pd.proxy.errors import ProxyError
from pd.proxy.flow import Leg, SequentialFlow, until_disconnect, upstream_chunks
from pd.proxy.tokenizer import TextStream
from pd.transfer.params import KVTransferParams

# Sampling fields whose effect depends on where the first token sits (in the prompt
# or in the output), or on seeing the output from its start.
_POSITION_DEPENDENT = (
    "echo", "logprobs", "top_logprobs", "prompt_logprobs", "seed", "stop", "tools",
    "functions", "response_format", "structured_outputs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "use_beam_search", "best_of", "return_token_ids",
    "return_tokens_as_token_ids", "logprob_token_ids",
)  # fmt: skip
_NEUTRAL_PENALTY = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions


def qualifies(endpoint: str, body: dict[str, Any], chat_output_parsed: bool) -> bool:
    """Whether moving the first token from the output into the prompt leaves the
    answer as it is (and there is a first token worth sending early)."""
    if not body.get("stream") or body.get("n", 1) != 1:
        return False
    if endpoint == "chat/completions" and (chat_output_parsed or not _text_only(body)):
        # A reasoning or tool parser must see the output from its start; vLLM renders
        # messages with images or audio again instead of taking the token ids.
        return False
    if endpoint == "completions" and not _single_prompt(body.get("prompt")):
        return False
    if any(body.get(key) not in (None, False, [], {}) for key in _POSITION_DEPENDENT):
        return False
    if any(body.get(k, neutral) != neutral for k, neutral in _NEUTRAL_PENALTY.items()):
        return False
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        return False
    limit = _max_tokens(endpoint, body)
    return limit is None or limit >= 2


def _text_only(body: dict[str, Any]) -> bool:
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return False
    return True


def _single_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _max_tokens(endpoint: str, body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return int(body[key])
    return _COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == "completions" else None


@dataclass(frozen=True)
class FirstToken:
    """The prefill leg's token, and what is needed to continue after it."""

    id: str  # the answer's id: every event of the stream carries it
    created: int
    model: str
    text: str
    token_id: int
    prompt_token_ids: list[int]

    @property
    def text_is_whole(self) -> bool:
        """Whether the token's text ends on a character: then decode, primed with the
        prompt plus this token, writes the rest of the text as a single instance would."""
        return bool(self.text) and "\ufffd" not in self.text

    @classmethod
    def from_answer(cls, endpoint: str, answer: dict[str, Any]) -> FirstToken | None:
        """None if the answer cannot be continued: the request ended with this token."""
        try:
            choice = answer["choices"][0]
            if choice.get("finish_reason") != "length":
                return None  # EOS or a stop token: decode must see it end the same way
            if endpoint == "completions":
                text, prompt_ids = choice["text"], choice["prompt_token_ids"]
            else:
                text, prompt_ids = choice["message"]["content"], answer["prompt_token_ids"]
            (token_id,) = choice["token_ids"]
            first = cls(answer["id"], int(answer["created"]), answer["model"], text,
                        int(token_id), [int(t) for t in prompt_ids])  # fmt: skip
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        return first if isinstance(first.text, str) else None

    def continuation(
        self, leg: Leg, params: dict[str, Any], token_ids: bool = False
    ) -> dict[str, Any]:
        """The decode leg's body: the prompt plus this token, one token less to go.

        ``params``: the prefill answer's ``kv_transfer_params``; ``token_ids``: decode
        streams its token ids too (the proxy writes the text).
        """
        body = dict(leg.body)
        if token_ids:
            body["return_token_ids"] = True
        ids = [*self.prompt_token_ids, self.token_id]
        decode_params = KVTransferParams.from_dict(params)
        if leg.endpoint == "completions":
            body["prompt"] = ids
        else:  # vLLM skips its chat template, uses these
            decode_params = decode_params.replace(prompt_token_ids=tuple(ids))
        body["kv_transfer_params"] = decode_params.to_dict()
        limit = _max_tokens(leg.endpoint, body)
        if limit is not None:
            key = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
            body[key] = limit - 1
        if body.get("min_tokens"):
            body["min_tokens"] = max(0, int(body["min_tokens"]) - 1)
        return body

    def opening_events(self, endpoint: str) -> bytes:
        """What the client gets at once: this token as the stream's first event(s)."""
        if endpoint == "completions":
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": None}
            return _event(self._chunk("text_completion", choice))
        role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}  # fmt: skip
        content = {"index": 0, "delta": {"content": self.text}, "logprobs": None,
                   "finish_reason": None}  # fmt: skip
        return _event(self._chunk("chat.completion.chunk", role)) + _event(
            self._chunk("chat.completion.chunk", content)
        )

    def _chunk(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip


class Continuation:
    """Rewrites decode's stream so that it reads as the rest of the client's stream:
    the first token's id on every event, no second opening (chat's role event), and
    usage counted as if the first token had been generated by decode.

    With ``text``, the text of each event is the proxy's, from the token ids decode
    sends (which the client did not ask for, so they are taken out again).
    """

    def __init__(
        self, first: FirstToken, text: TextStream | None = None, stop_in_text: bool = False
    ) -> None:
        """``stop_in_text``: the request's ``include_stop_str_in_output``: a stop token
        ending the answer is written into its text (vLLM leaves it out otherwise)."""
        self._id = first.id
        self._pending = b""
        self._text = text
        self._stop_in_text = stop_in_text

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        *events, self._pending = self._pending.split(b"\n\n")
        return b"".join(self._rewrite(event) for event in events if event.strip())

    def _rewrite(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event + b"\n\n"
        chunk = json.loads(event[len(b"data: ") :])
        if "error" in chunk:
            return event + b"\n\n"
        chunk["id"] = self._id
        for choice in chunk.get("choices") or []:
            if self._text is not None:
                self._write_text(self._text, chunk, choice)
            delta = choice.get("delta")
            if not isinstance(delta, dict) or "role" not in delta:
                continue
            del delta["role"]  # the client's stream opened with the first token
            if not delta.get("content") and choice.get("finish_reason") is None:
                return b""  # decode's opening event, with nothing else in it
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            usage["prompt_tokens"] -= 1
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + 1
        return _event(chunk)

    def _write_text(self, text: TextStream, chunk: dict[str, Any], choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids") or []
        for fields in (chunk, choice):  # as they read when not asked for
            for key in ("token_ids", "prompt_token_ids"):
                if fields.get(key) is not None:
                    fields[key] = None
        if choice.get("finish_reason") == "stop" and ids and not self._stop_in_text:
            ids = ids[:-1]  # the stop token: vLLM's detokenizer skips it too
        written = text.text(ids)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if written or "content" in delta:
                delta["content"] = written
        else:
            choice["text"] = written


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class FirstTokenFlow(SequentialFlow):
    """Sequential, but a streamed request's first token comes from the prefill leg."""

    async def serve(self, leg: Leg) -> Response:
        if not qualifies(leg.endpoint, leg.body, self._chat_output_parsed):
            return await super().serve(leg)
        before_prefill = time.monotonic()
        # As in the sequential flow: a client that leaves during prefill aborts it.
        answer = await until_disconnect(
            leg.request, self._prefill_answer(leg, return_token_ids=True)
        )
        after_prefill = time.monotonic()
        if isinstance(answer, Response):
            return answer  # prefill rejected the request: that is the answer
        assert leg.prefill is not None
        params = self._kv_params(leg.prefill, answer) if answer else None
        first = FirstToken.from_answer(leg.endpoint, answer) if answer and params else None
        text = None
        if first is not None and not first.text_is_whole:
            text = await self._own_text(leg, first)
        if first is None or params is None or (text is None and not first.text_is_whole):
            # No KV to hand over, or no token to continue from: as the sequential flow.
            body = {**leg.body, "kv_transfer_params": params.to_dict()} if params else leg.body
            self._observe_own_time(before_prefill - leg.started + time.monotonic() - after_prefill)
            return await self._decode_stream(leg, body)
        body = first.continuation(leg, params.to_dict(), token_ids=text is not None)
        rest = Continuation(
            first, text, stop_in_text=bool(leg.body.get("include_stop_str_in_output"))
        )
        self._metrics.first_tokens.inc()
        self._observe_own_time(before_prefill - leg.started + time.monotonic() - after_prefill)
        return self._stream_response(leg, self._stream(leg, first, body, rest))

    async def _own_text(self, leg: Leg, first: FirstToken) -> TextStream | None:
        """The proxy's TextStream for this answer, past its first token; None if the
        proxy cannot write the text as vLLM would."""
        skip_special = leg.body.get("skip_special_tokens", True) is not False
        if self._tokenizer is None or (
            not skip_special and leg.body.get("spaces_between_special_tokens") is False
        ):
            return None  # vLLM's own spacing rule for that case is not repeated here
        text = await self._tokenizer.text_stream(first.prompt_token_ids, skip_special)
        if text is not None:
            text.text([first.token_id])  # the client has it: first.text, the same
        return text

    async def _stream(
        self, leg: Leg, first: FirstToken, body: dict[str, Any], rest: Continuation
    ) -> AsyncGenerator[bytes, None]:
        yield first.opening_events(leg.endpoint)
        upstream = await self._open_stream(leg, body)
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            raise ProxyError(upstream.status_code, _error_message(content))
        chunks = upstream_chunks(upstream)
        try:
            async for data in chunks:
                out = rest.feed(data)
                if out:
                    yield out
        finally:
            await chunks.aclose()


def _error_message(content: bytes) -> str:
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace")[:500] or "decode failed"
