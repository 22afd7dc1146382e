"""What one scenario recorded: its requests' outcomes, its checks, what the fault left."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from pd.serve_process import PdServeProcess

from .client import Outcome


class Abort(Exception):
    """A required step of the scenario failed; the rest of it cannot run."""


@dataclass
class ScenarioResult:
    name: str
    description: str = ""
    outcomes: list[Outcome] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    stranded_blocks: dict[str, int] = field(default_factory=dict)  # instance -> blocks
    connections: tuple[int, int] | None = None  # (baseline, after)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def stranded(self) -> int:
        return sum(max(0, b) for b in self.stranded_blocks.values())

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, bool(ok), detail))
        return bool(ok)

    def require(self, what: str, ok: bool, detail: str = "") -> None:
        if not self.check(what, ok, detail):
            raise Abort(what)

    def failures(self) -> list[str]:
        problems = [f"{what}: {detail}" for what, ok, detail in self.checks if not ok]
        for outcome in self.outcomes:
            if outcome.kind in ("lost", "hung"):
                problems.append(
                    f"request {outcome.kind} ({outcome.elapsed_s:.1f}s): {outcome.detail}"
                )
        return problems

    def summary(self) -> str:
        lines = [
            f"scenario {self.name}: sent {len(self.outcomes)}, "
            f"completed {self.count('completed')}, error {self.count('error')}, "
            f"lost {self.count('lost')}, hung {self.count('hung')}, "
            f"stranded {self.stranded_blocks}, connections {self.connections}"
        ]
        for what, ok, detail in self.checks:
            lines.append(
                f"  [{'ok' if ok else 'FAILED'}] {what}" + (f": {detail}" if detail else "")
            )
        for outcome in self.outcomes:
            if outcome.kind != "completed":
                lines.append(
                    f"  {outcome.kind} {outcome.status} {outcome.elapsed_s:.1f}s "
                    f"{outcome.detail[:200]}"
                )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# A scenario injects its fault, sends requests around it and records into the result.
Scenario = Callable[[PdServeProcess, httpx.AsyncClient, ScenarioResult], Awaitable[None]]
