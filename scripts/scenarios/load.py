"""The load scenario: many concurrent streaming clients for a while, the proxy's RSS sampled."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from pd.serve_process import PdServeProcess

from .client import completion_body, send
from .results import Scenario, ScenarioResult


@dataclass
class MemoryTrace:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MiB)

    def quarter_means(self) -> tuple[float, float]:
        values = [rss for _, rss in self.samples]
        quarter = max(1, len(values) // 4)
        return statistics.mean(values[:quarter]), statistics.mean(values[-quarter:])

    def peak(self) -> float:
        return max(rss for _, rss in self.samples)


def load_scenario(clients: int, duration_s: float, memory: MemoryTrace | None = None) -> Scenario:
    async def load(serve: PdServeProcess, http: httpx.AsyncClient, r: ScenarioResult) -> None:
        stop_at = time.monotonic() + duration_s
        deadline_s = serve.request_s + 60
        rng = random.Random(6)

        async def client(index: int) -> None:
            while time.monotonic() < stop_at:
                body = completion_body(
                    rng.randrange(50, 1200), rng.randrange(8, 64), stream=True, chat=index % 2 == 1
                )
                r.outcomes.append(await send(http, serve.url, body, deadline_s))

        async def sample_memory() -> None:
            started = time.monotonic()
            while time.monotonic() < stop_at:
                if memory is not None:
                    memory.samples.append((time.monotonic() - started, serve.rss_mib()))
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(client(i) for i in range(clients)))
        await sampler
        r.check(
            "every request completes or gets a clear error",
            all(o.kind in ("completed", "error") for o in r.outcomes),
            f"{r.count('lost')} lost, {r.count('hung')} hung",
        )
        if memory is not None and len(memory.samples) >= 8:
            first, last = memory.quarter_means()
            r.check(
                "proxy memory flat: last quarter's mean RSS within 10% of the first's",
                last <= first * 1.10,
                f"{first:.0f} MiB -> {last:.0f} MiB",
            )

    load.__name__ = f"load_{clients}_clients_{duration_s:g}s"
    load.__doc__ = (
        f"{clients} concurrent streaming clients (completions and chat, prompts "
        f"of 50-1200 tokens, 8-64 output tokens) for {duration_s:g} s"
    )
    return load
