"""Token-length statistics for the validation report."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in [0, 100]) of an ascending sequence."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return int(sorted_values[min(rank, len(sorted_values)) - 1])


def length_stats(lengths: Sequence[int]) -> dict:
    """min / mean / p50 / p95 / max of token lengths (zeros when empty)."""
    values = sorted(lengths)
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {
        "min": int(values[0]),
        "mean": round(sum(values) / len(values), 2),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": int(values[-1]),
    }
