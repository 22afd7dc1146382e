"""Statistics the benchmarks share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's linear interpolation between the closest ranks, which vLLM's benchmark
    uses too; NaN when there are no values (a run that measured nothing)."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(values, q))
