"""The transfer layer: pd's vLLM KV connector and its transports."""
