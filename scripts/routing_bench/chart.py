"""routing.png from routing.json alone: per workload, each system's hit rate against
the ideal and its TTFT percentiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import hit_rate
from .systems import SYSTEMS

COLORS = {"kv_aware": "#55a868", "least_loaded": "#4c72b0", "round_robin": "#dd8452",
          "one_prefill": "#8172b2"}  # fmt: skip


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [
        w for w in ("conversation", "shared-prefix")
        if any("error" not in r for r in results["rows"].get(w, {}).values())
    ]  # fmt: skip
    if not workloads:
        return
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.6 * len(workloads)),
                             layout="constrained", squeeze=False)  # fmt: skip
    for (hits, ttft), workload in zip(axes, workloads, strict=True):
        rows = {s: r for s, r in results["rows"][workload].items()
                if s in SYSTEMS and "error" not in r}  # fmt: skip
        names = [s for s in SYSTEMS if s in rows]
        shares = [100 * hit_rate(rows[s])["share"] for s in names]
        hits.bar(names, shares, color=[COLORS[s] for s in names])
        for x, v in enumerate(shares):
            hits.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ideal = 100 * results["ideal"][workload]["share"]
        hits.axhline(ideal, color="0.3", linestyle="--", linewidth=0.8)
        hits.text(-0.5, ideal, f"ideal {ideal:.1f}%", ha="left", va="bottom",
                  fontsize=8)  # fmt: skip
        hits.set_title(f"{workload}: prompt tokens reused, % (higher is better)", fontsize=9)
        width = 0.8 / max(1, len(names))
        for i, s in enumerate(names):
            values = [rows[s][f"p{q}_ttft_ms"] for q in (50, 90, 99)]
            pos = [j + (i - (len(names) - 1) / 2) * width for j in range(3)]
            ttft.bar(pos, values, width, color=COLORS[s], label=s)
        ttft.set_xticks(range(3), ["p50", "p90", "p99"])
        ttft.set_yscale("log")
        ttft.set_title(f"{workload}: TTFT ms, log scale (lower is better)", fontsize=9)
        ttft.legend(fontsize=7, frameon=False)
        for ax in (hits, ttft):
            ax.spines[["top", "right"]].set_visible(False)
            ax.tick_params(axis="both", labelsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
