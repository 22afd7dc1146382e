"""The OpenAI-compatible proxy: routes each request prefill-then-decode."""
