"""The model's tokenizer in the proxy: token ids for routing policies that ask for them,
and an answer's text for the streams the proxy writes itself (the first-token flow).

Loaded before the proxy serves (``load``), off the event loop; pd-serve starts the
import of transformers (seconds of CPU: it imports torch) while its instances start
(``import_in_background``), so that cost never lands on the first requests. Short
prompts are then tokenized on the event loop and long ones on a thread
(``INLINE_MAX_CHARS``). It tokenizes as vLLM's OpenAI server does: a completion prompt
with the tokenizer's special tokens, a chat through the model's chat template. It
detokenizes as vLLM's detokenizer does: a ``tokenizers`` DecodeStream primed with the
prompt. A tokenizer that cannot be loaded is reported once; routing then goes by load,
and the first-token flow sends the requests that need the proxy's text sequentially.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# tokenizers' DecodeStream raises this when a tokenizer's output is not monotonic;
# vLLM's detokenizer then starts a new stream, and so does TextStream.
_INVALID_PREFIX = "Invalid prefix encountered"

# Prompts up to this many characters are tokenized on the event loop (about 1 ms at
# most here), longer ones on a thread. Handing a short prompt to a thread and back costs
# two thread wake-ups and a GIL hand-off: on busy cores that took milliseconds, more
# than the tokenizing, and the request waited for it. Longer prompts would stall every
# request in flight for as long as they take.
INLINE_MAX_CHARS = 4096
# A stream's DecodeStream only keeps its prompt's ids: cheap to make on the loop.
INLINE_MAX_STREAM_PROMPT_IDS = 32768


def import_in_background() -> threading.Thread:
    """Import transformers' AutoTokenizer now, in a daemon thread. Importing it takes
    3-5 s of CPU here (it imports torch); loading a tokenizer after that takes ~50 ms."""

    def _import() -> None:
        try:
            from transformers import AutoTokenizer  # noqa: F401
        except Exception as e:  # the load reports it (once), with the model named
            logger.debug("proxy: importing transformers failed: %r", e)

    thread = threading.Thread(target=_import, name="pd-import-transformers", daemon=True)
    thread.start()
    return thread


def _chat_chars(body: dict[str, Any]) -> int | None:
    """The characters a chat's messages hold; None for content that is not text (parts,
    images) or with tools: how long its template takes is not told by its length."""
    if body.get("tools"):
        return None
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if content is None:
            continue
        if not isinstance(content, str):
            return None
        total += len(content)
    return total


class TextStream:
    """An answer's text, token by token, as vLLM's detokenizer writes it for a request
    with this prompt: the same DecodeStream, primed with the same prompt ids."""

    def __init__(self, backend: Any, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        """``backend``: the fast tokenizer's ``tokenizers.Tokenizer``."""
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    def text(self, token_ids: list[int]) -> str:
        """The text these next tokens add ("" while a character is incomplete)."""
        return "".join(self._step(token_id) or "" for token_id in token_ids)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except (OverflowError, TypeError):
            return None  # an id the tokenizer does not know: vLLM writes nothing for it
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            from tokenizers.decoders import DecodeStream  # the rare reset, off the token path

            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)


class ModelTokenizer:
    def __init__(self, model: str) -> None:
        """``model``: a local model folder or hub id, as ``vllm serve`` takes it."""
        self._model = model
        self._tokenizer: Any = None
        self._failed = False
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        """Loaded, or known not to load."""
        return self._tokenizer is not None or self._failed

    async def load(self) -> None:
        """Load it now, off the event loop: importing transformers and reading the
        tokenizer holds the GIL for seconds, which the first request that needs it
        would otherwise wait for (and every request in flight with it)."""
        await asyncio.to_thread(self._load)

    async def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if endpoint == "completions":
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]  # a batch of one
            # Token ids, as they came. Only the first is checked: checking all 2k of a
            # prompt took ~0.1 ms of the routing time, and a list of ids with something
            # else in it is vLLM's to reject (here it would only hash to misses).
            if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
                return prompt
            if not isinstance(prompt, str):
                return None  # several prompts: no single prompt to route by
            return await self._run(len(prompt) <= INLINE_MAX_CHARS, self._tokenize, prompt, body)
        chars = _chat_chars(body)
        inline = chars is not None and chars <= INLINE_MAX_CHARS
        return await self._run(inline, self._tokenize, None, body)

    async def text_stream(
        self, prompt_ids: list[int], skip_special_tokens: bool
    ) -> TextStream | None:
        """A TextStream for an answer to ``prompt_ids``; None without a fast tokenizer
        (vLLM detokenizes a slow one differently)."""
        inline = len(prompt_ids) <= INLINE_MAX_STREAM_PROMPT_IDS
        return await self._run(inline, self._text_stream, prompt_ids, skip_special_tokens)

    async def _run(self, inline: bool, work: Callable[..., T], *args: Any) -> T:
        """``work`` on the event loop when ``inline`` and the tokenizer is loaded (loading
        holds the GIL for seconds), else on a thread."""
        if inline and self.settled:
            return work(*args)
        return await asyncio.to_thread(work, *args)

    def _text_stream(self, prompt_ids: list[int], skip_special_tokens: bool) -> TextStream | None:
        backend = getattr(self._load(), "_tokenizer", None)  # transformers' fast tokenizers
        if backend is None:
            return None
        return TextStream(backend, prompt_ids, skip_special_tokens)

    def _tokenize(self, prompt: str | None, body: dict[str, Any]) -> list[int] | None:
        """``prompt``'s ids, or (None) those of the chat in ``body``."""
        tokenizer = self._load()
        if tokenizer is None:
            return None
        try:
            if prompt is not None:
                return [int(t) for t in tokenizer.encode(prompt)]
            ids = tokenizer.apply_chat_template(
                body.get("messages") or [],
                tools=body.get("tools"),
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
                tokenize=True,
                **(body.get("chat_template_kwargs") or {}),
            )
            if not isinstance(ids, list):  # transformers versions differ: a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        except Exception as e:  # a template that rejects these messages: vLLM will say so
            logger.debug("routing: cannot tokenize a request: %r", e)
            return None

    def _load(self) -> Any:
        with self._lock:
            if not self.settled:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self._model)
                except Exception as e:
                    self._failed = True
                    logger.warning(
                        "proxy: the tokenizer of %s did not load (%r); routing goes by "
                        "load, first tokens wait for decode", self._model, e,
                    )  # fmt: skip
            return self._tokenizer
