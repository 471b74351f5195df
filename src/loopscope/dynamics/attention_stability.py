"""Attention stabilisation across recurrences, as numbers (Blayney et al. 2026 §3.4, Figs. 2 and 23).

- `attention_self_match`: from `attention_distance` (every (recurrence, layer) pattern against every other), the
  fraction of block-layer patterns whose nearest pattern among the other recurrences belongs to the same layer —
  1 when each layer repeats its own pattern every recurrence (the diagonal bands of Fig. 2).
- `attention_shrink`: from `distance_to_fixed_point`'s attention column, how much of the first recurrence's
  distance to the final pattern is left one recurrence before the end (Fig. 23 falling).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def attention_self_match(distance: pd.DataFrame) -> float:
    """Fraction of block-layer attention patterns (recurrence t, layer j) whose nearest pattern among the other
    recurrences' (t' ≠ t, any layer) belongs to the same layer j: 1 = the diagonal bands of the paper's Fig. 2.
    `distance` is `dynamics.attention_distance` (square, indexed by (recurrence, layer)); NaN for a one-layer
    block or a single recurrence (nothing to match)."""
    rec = distance.index.get_level_values("recurrence").to_numpy()
    layer = distance.index.get_level_values("layer").to_numpy()
    if len(set(rec)) < 2 or len(set(layer)) < 2:
        return math.nan
    d = distance.to_numpy(dtype=float)
    hits = []
    for i in range(len(rec)):
        others = np.where(rec != rec[i])[0]
        nearest = others[np.nanargmin(d[i, others])]
        hits.append(layer[nearest] == layer[i])
    return float(np.mean(hits))



def attention_shrink(to_last: pd.DataFrame) -> float:
    """mean_j ‖A_{j,R−2} − A_{j,R−1}‖_F / mean_j ‖A_{j,0} − A_{j,R−1}‖_F on the capture with attention: how much
    of the first recurrence's distance to the final pattern is left one step before the end (NaN if R < 3)."""
    r = to_last["recurrence"].max()
    if r < 2:
        return math.nan
    late = to_last.loc[to_last["recurrence"] == r - 1, "attention_frobenius_mean"].mean()
    early = to_last.loc[to_last["recurrence"] == 0, "attention_frobenius_mean"].mean()
    return float(late / early) if early > 0 else math.nan
