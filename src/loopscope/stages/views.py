"""Three views of any per-state metric table (Blayney et al. 2026 §3.6), as plot-ready DataFrames.

Input: a table with the identifying columns `segment, recurrence, layer, depth, relative_depth` and one
row per state (aggregate heads / prompts first, or select one head), plus the column `value` to plot.
Every view returns `x`, `y` and `y_std` (the matching `<stem>_std` column when the table has one, where
`value` is `<stem>_mean` or `<stem>`; NaN otherwise), `n` when present, and the identifying columns.

- `by_realized_depth`: no grouping; x = realized depth (1 = first prelude layer), sorted.
- `by_recurrence`: one profile per recurrence t = prelude + block pass t + coda (prelude and coda are
  repeated in every profile, as in the paper's Fig. 8); x = percentage-scaled relative depth within the
  profile, x_i = 100 · i / (N − 1) for its i-th state of N (0 = first state, 100 = last; the embedding, if
  present, is the first state). A feedforward model captured with R = 1 gives a single profile on the same
  0..100 axis, so profiles of models with different depths overlay and can be compared (`alignment`).
- `by_layer`: one series per unique block layer j across recurrences; x = recurrence t.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopscope.errors import InputError
from loopscope.stages.frames import STATE_COLUMNS, std_column

SEGMENT_ORDER = {"embed": 0, "prelude": 1, "core": 2, "coda": 3}


def plot_frame(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Validate and reduce `df` to identifying columns + y, y_std (+ n), sorted by depth."""
    missing = [c for c in [*STATE_COLUMNS, value] if c not in df.columns]
    if missing:
        raise InputError(f"the table lacks columns {missing}; give a stages metric table and one of its value "
                         f"columns ({[c for c in df.columns if c not in STATE_COLUMNS]})")
    if df.duplicated(["segment", "recurrence", "layer"]).any():
        extra = [c for c in ("head", "batch") if c in df.columns]
        per = f" (it has per-{'/'.join(extra)} rows)" if extra else ""
        raise InputError(f"several rows share one state (segment, recurrence, layer){per}; aggregate first "
                         "(per_head=False / per_prompt=False, or loopscope.stages.summarise) or select one, "
                         "e.g. df[df['head'] == 0]")
    out = df[STATE_COLUMNS].copy()
    out["y"] = df[value].astype(float)
    std = std_column(value)
    out["y_std"] = df[std].astype(float) if std in df.columns and std != value else np.nan
    if "n" in df.columns:
        out["n"] = df["n"]
    return out.sort_values("depth", kind="stable").reset_index(drop=True)


def by_realized_depth(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Columns: segment, recurrence, layer, depth, relative_depth, x (= depth), y, y_std[, n]."""
    out = plot_frame(df, value)
    out.insert(5, "x", out["depth"].astype(float))
    return out


def by_recurrence(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Columns: recurrence (the profile's pass t), segment, layer, depth, position (0..N−1), x (% of the
    profile, 0..100), y, y_std[, n]. Prelude / coda (and embed) rows appear in every profile."""
    frame = plot_frame(df, value)
    core = frame[frame.segment == "core"]
    if core.empty:
        raise InputError("the table has no block ('core') states; by_recurrence needs at least one recurrence")
    before = frame[frame.segment.isin(["embed", "prelude"])]
    after = frame[frame.segment == "coda"]
    profiles = []
    for t in sorted(core.recurrence.unique()):
        prof = pd.concat([before, core[core.recurrence == t], after], ignore_index=True)
        N = len(prof)
        prof = prof.drop(columns=["recurrence", "relative_depth"])
        prof.insert(0, "recurrence", int(t))
        prof.insert(4, "position", range(N))
        prof.insert(5, "x", 100.0 * np.arange(N) / (N - 1) if N > 1 else 0.0)
        profiles.append(prof)
    return pd.concat(profiles, ignore_index=True)


def by_layer(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Columns: layer (block layer j, the series), recurrence, depth, x (= recurrence), y, y_std[, n]."""
    frame = plot_frame(df, value)
    core = frame[frame.segment == "core"]
    if core.empty:
        raise InputError("the table has no block ('core') states; by_layer follows block layers across recurrences")
    out = core.sort_values(["layer", "recurrence"], kind="stable").drop(columns=["segment", "relative_depth"])
    out = out[["layer", "recurrence", "depth", *[c for c in out.columns if c not in ("layer", "recurrence", "depth")]]]
    out.insert(3, "x", out["recurrence"].astype(float))
    return out.reset_index(drop=True)
