"""serving.png from the results alone: the systems a user chooses between, per workload.

One small multiple per metric (rows) and workload (columns), one bar per system, its
value written on it: each panel has its own scale, since a workload's figures are
compared across systems, not across workloads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .settings import KNOWN_WORKLOADS, Load, workload_order
from .systems import PD_DEFAULT, system_order

# The choice a user makes, in the legend's words. Other systems are in serving.md's tables.
CHART_SYSTEMS = {
    "colocated": "colocated: one vLLM instance on both cores",
    PD_DEFAULT: f"pd's default ({PD_DEFAULT}): prefill and decode on a core each",
    "vllm-pd-tuned": "stock vLLM P/D (NixlConnector), CPU defects neutralized",
}
# (result key, row title)
METRICS = (
    ("p50_ttft_ms", "TTFT p50, ms\n(lower is better)"),
    ("p99_itl_ms", "inter-token latency\np99, ms (lower is better)"),
    ("output_throughput", "output tokens/s\n(higher is better)"),
)
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


def chart(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    workloads = sorted(results, key=workload_order)
    present = {s for rows in results.values() for s in rows}
    systems = [s for s in CHART_SYSTEMS if s in present] or sorted(present, key=system_order)
    if not workloads or not systems:
        return
    colors = dict(zip(systems, COLORS, strict=False))
    fig, axes = plt.subplots(
        len(METRICS), len(workloads), squeeze=False, layout="constrained",
        figsize=(1.0 + 2.1 * len(workloads), 1.2 + 2.2 * len(METRICS)),
    )  # fmt: skip
    for col, workload in enumerate(workloads):
        rows = results[workload]
        axes[0][col].set_title(_title(workload), fontsize=9)
        for row, (key, label) in enumerate(METRICS):
            ax = axes[row][col]
            values = [_value(rows.get(s, {}), key) for s in systems]
            shown = [v for v in values if v is not None]
            top = max(shown, default=1.0) or 1.0
            for x, (system, value) in enumerate(zip(systems, values, strict=True)):
                if value is None:
                    ax.text(x, 0.02 * top, "failed" if rows.get(system) else "not run",
                            rotation=90, ha="center", va="bottom", fontsize=7,
                            color="0.4")  # fmt: skip
                    continue
                ax.bar(x, value, 0.75, color=colors[system])
                if key == "output_throughput" and value > 0.3 * top:
                    # inside the bar: the offered-load line runs just above the bars
                    ax.text(x, 0.96 * value, _fmt(value), ha="center", va="top", fontsize=7,
                            color="white")  # fmt: skip
                else:
                    ax.text(x, value, _fmt(value), ha="center", va="bottom", fontsize=7)
            offered = _offered(workload) if key == "output_throughput" else None
            if offered is not None:  # no system can produce more than arrives
                ax.axhline(offered, color="0.3", linestyle="--", linewidth=0.8)
                ax.text(len(systems) - 0.45, offered, "offered", ha="right", va="bottom",
                        fontsize=7, color="0.3")  # fmt: skip
                top = max(top, offered)
            ax.set_ylim(0, top * 1.18)  # room for the value above the tallest bar
            ax.set_xlim(-0.6, len(systems) - 0.4)
            ax.set_xticks([])
            ax.tick_params(axis="y", labelsize=7)
            ax.spines[["top", "right"]].set_visible(False)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.legend(
        handles=[Patch(color=colors[s]) for s in systems],
        labels=[CHART_SYSTEMS.get(s, s) for s in systems],
        loc="outside upper center", ncols=min(3, len(systems)), fontsize=8, frameon=False,
    )  # fmt: skip
    fig.supxlabel(
        "vllm bench serve against each system on the same model, cores and arrivals; "
        "every system, percentile and run is in serving.md",
        fontsize=8, color="0.3",
    )  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if "error" in row or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _offered(workload: str) -> float | None:
    """Output tokens/s the reported stream asks for."""
    spec = KNOWN_WORKLOADS.get(workload)
    return spec.main.rate * spec.main.output_len if spec else None


def _title(workload: str) -> str:
    spec = KNOWN_WORKLOADS.get(workload)
    if spec is None:
        return workload

    def load(x: Load) -> str:
        return f"{x.input_len} in, {x.output_len} out, {x.rate:g} req/s"

    lines = [workload, load(spec.main)]
    if spec.background:
        lines.append(f"+ {load(spec.background)}")
    return "\n".join(lines)
