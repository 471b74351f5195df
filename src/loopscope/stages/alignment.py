"""Alignment score: how closely each recurrence of a looped model re-enacts a feedforward model's stages.

Blayney et al. (2026) §5 / Fig. 8 compare, by eye, each recurrence's depth profile (prelude + block pass +
coda, percentage-scaled) with a feedforward model's profile. We turn that into numbers. For recurrence t:

    f_t(x), g(x)  = the `by_recurrence` profiles of the looped and the feedforward table, resampled by
                    linear interpolation onto a common grid x_k = 100·k/(G − 1), k = 0..G−1 (G = 50);
    pearson       = corr(f_t, g);  spearman = corr(rank f_t, rank g) (average ranks for ties);
    rmse          = sqrt(mean_k (f_t(x_k) − g(x_k))²);
    nrmse         = rmse / (max g − min g)  (scale-free distance; NaN for a flat feedforward profile).

Identical profiles give pearson = spearman = 1, rmse = 0; a reversed linear profile gives −1. Correlations
are NaN when either resampled profile is constant. `colsum_alignment` reads the ColSum rows of such a table as
three numbers (median, last pass, mean of the earlier passes).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loopscope.errors import InputError
from loopscope.stages.views import by_recurrence


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN if either vector is constant."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())


def resample(profile: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of a by_recurrence profile (x in 0..100, y) onto `grid`."""
    x, y = profile["x"].to_numpy(float), profile["y"].to_numpy(float)
    if np.isnan(y).any():
        raise InputError("the profile has NaN values; drop or fill them before computing alignment")
    if len(x) == 1:
        return np.full_like(grid, y[0])
    return np.interp(grid, x, y)


def alignment(looped_df: pd.DataFrame, feedforward_df: pd.DataFrame, value: str, grid: int = 50) -> pd.DataFrame:
    """One row per recurrence of `looped_df`: recurrence, pearson, spearman, rmse, nrmse, n_points.

    `feedforward_df` is the same metric for a feedforward model (a Trajectory with R = 1: its layers as the
    block, no prelude/coda, or any single-pass table).
    """
    if grid < 2:
        raise InputError(f"grid={grid}: use at least 2 points")
    reference = by_recurrence(feedforward_df, value)
    if reference.recurrence.nunique() != 1:
        raise InputError(f"the feedforward table has {reference.recurrence.nunique()} recurrences; "
                         "capture the comparison model with recurrences=1")
    xs = np.linspace(0.0, 100.0, grid)
    g = resample(reference, xs)
    spread = float(g.max() - g.min())
    rows = []
    for t, profile in by_recurrence(looped_df, value).groupby("recurrence", sort=True):
        f = resample(profile, xs)
        rmse = float(np.sqrt(np.mean((f - g) ** 2)))
        rows.append({"recurrence": int(t), "pearson": pearson(f, g), "spearman": spearman(f, g), "rmse": rmse,
                     "nrmse": rmse / spread if spread > 0 else float("nan"), "n_points": grid})
    return pd.DataFrame(rows)


def colsum_alignment(alignment: pd.DataFrame) -> dict[str, float]:
    """Median, last-pass and mean earlier-pass Pearson r of the ColSum profile against the control."""
    if alignment is None or alignment.empty:
        return {"colsum_pearson_median": math.nan, "colsum_pearson_last": math.nan, "colsum_pearson_early": math.nan}
    a = alignment[alignment["metric"] == "colsum_concentration"].sort_values("recurrence")
    return {"colsum_pearson_median": float(a["pearson"].median()),
            "colsum_pearson_last": float(a["pearson"].iloc[-1]),
            "colsum_pearson_early": float(a["pearson"].iloc[:-1].mean()) if len(a) > 1 else math.nan}
