"""pd: disaggregated prefill/decode serving for LLMs on vLLM."""

__version__ = "0.1.0"
