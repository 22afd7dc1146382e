"""pd's vLLM KV connector: assembles the prefill and decode roles for vLLM.

vLLM loads it as ``pd.transfer.connector:PDConnector`` (the documented path).
"""
