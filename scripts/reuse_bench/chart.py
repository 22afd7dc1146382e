"""reuse.png from reuse.json alone: the documents' TTFT per pass and system, the trace's
TTFT percentiles per system, and each target's measured value over its bound."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLORS = {"store": "#4c72b0", "vllm": "#dd8452"}
LEGEND = {"store": "store: pd's connector + the node's KV store",
          "vllm": "vllm: vLLM's prefix cache alone"}  # fmt: skip


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .report import TARGETS

    fig, (docs, trace, targets) = plt.subplots(
        1, 3, figsize=(13, 4.2), layout="constrained", width_ratios=(1.3, 1, 1.2)
    )
    s = results["settings"]
    bars = [(system, name, results["docqa"].get(system, {}).get(name, {}).get("p50_ms"))
            for system in ("store", "vllm")
            for name in ("cold", "repeated", "restarted")]  # fmt: skip
    bars = [(system, name, v) for system, name, v in bars if _num(v) is not None]
    for x, (system, _name, value) in enumerate(bars):
        docs.bar(x, value, 0.7, color=COLORS[system])
        docs.text(x, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
    docs.set_xticks(range(len(bars)), [name for _, name, _ in bars], fontsize=8)
    docs.set_title(f"long-document QA: {s['num_docs']} docs of {s['doc_tokens']} tokens,\n"
                   f"TTFT p50 ms per pass (lower is better)", fontsize=9)  # fmt: skip

    width = 0.38
    for i, system in enumerate(("store", "vllm")):
        row = results.get("trace", {}).get(system, {})
        for j, q in enumerate((50, 90, 99)):
            value = _num(row.get(f"p{q}_ttft_ms"))
            if value is None:
                continue
            pos = j + (i - 0.5) * width
            trace.bar(pos, value, width, color=COLORS[system])
            trace.text(pos, value, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
    trace.set_xticks(range(3), ["p50", "p90", "p99"], fontsize=8)
    trace.set_title(f"the conversation trace ({s['trace_prompts']} requests),\n"
                    "TTFT ms (lower is better)", fontsize=9)  # fmt: skip

    ratios = results.get("ratios", {})
    names, values = [], []
    for key, _what, short, bound, unit in TARGETS:
        value = _num(ratios.get(key))
        if value is None:
            continue
        # For the step-time target the measured figure is an overhead: 1 + it vs 1 + bound.
        shown = (1 + value) / (1 + bound) if unit == "%" else value / bound
        names.append(short)
        values.append(shown)
    y = range(len(values))
    targets.barh(y, values, 0.6, color=["#55a868" if v <= 1 else "#c44e52" for v in values])
    for yi, v in zip(y, values, strict=True):
        targets.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
    targets.axvline(1, color="0.3", linestyle="--", linewidth=0.8)
    targets.set_yticks(list(y), names, fontsize=7)
    targets.invert_yaxis()
    targets.set_title("each target: measured / bound\n(<= 1 meets it; step time as 1 + overhead)",
                      fontsize=9)  # fmt: skip
    for ax in (docs, trace, targets):
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="both", labelsize=7)
    fig.legend(handles=[Patch(color=c) for c in COLORS.values()], labels=list(LEGEND.values()),
               loc="outside upper center", ncols=2, fontsize=8, frameon=False)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
