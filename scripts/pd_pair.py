"""Run a prefill/decode pair of plain `vllm serve` instances with pd's connector.

Starts two vLLM OpenAI servers on loopback (prefill on core 0, decode on core 1),
sends one prompt through vLLM's disaggregation protocol (prefill with
``do_remote_decode``, then decode with the returned ``kv_transfer_params``), prints
both answers and the connector's transfer counters, and stops both servers. Exits 1
if decode did not load the prompt's KV from prefill.

    .venv/bin/python scripts/pd_pair.py [--model PATH] [--prompt TEXT]
    .venv/bin/python scripts/pd_pair.py --smoke   # 4 tokens instead of 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

from pd.models import make_model
from pd.vllm_server import VllmServer

KV_TRANSFER_CONFIG = json.dumps(
    {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": "pd.transfer.connector",
        "kv_role": "kv_both",
    }
)


def start_server(name: str, model: Path, core: str) -> VllmServer:
    return VllmServer(
        name,
        str(model),
        args=["--max-model-len", "2048", "--kv-transfer-config", KV_TRANSFER_CONFIG],
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": core},
        log_path=Path(tempfile.mkdtemp(prefix=f"pd-{name}-")) / "server.log",
    ).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the tiny model)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--smoke", action="store_true", help="generate 4 tokens, not 32")
    args = parser.parse_args()
    max_tokens = 4 if args.smoke else 32
    model = Path(args.model) if args.model else make_model("tiny")

    prefill = start_server("prefill", model, core="0")
    decode = start_server("decode", model, core="1")
    try:
        print("starting prefill and decode vLLM servers (about a minute on CPU)...")
        prefill.wait_ready()
        decode.wait_ready()
        body = {
            "model": str(model),
            "prompt": args.prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # the tiny model is random: show all the tokens asked for
        }
        first = httpx.post(
            f"{prefill.url}/v1/completions",
            json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            timeout=120,
        ).json()
        params = first["kv_transfer_params"]
        print("prefill returned kv_transfer_params:", {k: params[k] for k in sorted(params)})
        answer = httpx.post(
            f"{decode.url}/v1/completions",
            json={**body, "kv_transfer_params": params},
            timeout=120,
        ).json()
        print("decode answered:", repr(answer["choices"][0]["text"]))
        counters = {
            k: v
            for k, v in decode.metrics().items()
            if k.startswith("vllm:pd_kv_") and k.endswith("_total")
        }
        print("decode connector counters:", counters)
        if not counters.get("vllm:pd_kv_transfers_total"):
            print("decode did not load the prompt's KV from prefill", file=sys.stderr)
            return 1
        return 0
    finally:
        prefill.stop()
        decode.stop()


if __name__ == "__main__":
    sys.exit(main())
