"""A looped model's stage profile pass by pass: does each pass of the block repeat the last one?

- `stage_repeat_error`: RMS difference between every middle pass's block-layer profile and the last pass's, over
  the metric's spread over all states (0 = every pass after the first repeats the last exactly; Blayney et al.
  2026 §5, the repeating stages of Fig. 8).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def stage_repeat_error(stages: pd.DataFrame, value: str) -> float:
    """How far the block's stage profile is from repeating every pass: sqrt(mean over passes 1 ≤ t < R−1 and block
    layers j of (v_{t,j} − v_{R−1,j})²) / std of v over every state (prelude, all passes, coda). 0 = every pass
    after the first repeats the last exactly; NaN with fewer than 3 passes or a constant metric."""
    core = stages[stages["segment"] == "core"].pivot_table(index="recurrence", columns="layer", values=value)
    if len(core) < 3:
        return math.nan
    last = core.iloc[-1].to_numpy()
    middle = core.iloc[1:-1].to_numpy()
    scale = float(stages[value].std(ddof=0))
    if not scale > 0:
        return math.nan
    return float(np.sqrt(np.nanmean((middle - last) ** 2)) / scale)
