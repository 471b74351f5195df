"""Uncertainty for every number a verdict or a sweep rests on: percentile bootstrap intervals over prompts.

A rate over tokens (non-fixed-point tokens / tokens) is a ratio of per-prompt sums, so prompts — not tokens — are the
independent units: tokens of one prompt share its context. `bootstrap_ratio` resamples prompts with replacement
(Efron & Tibshirani 1993, §13.3 percentile interval): each replicate weights prompt b by its multinomial count w_b and
takes Σ w_b·num_b / Σ w_b·den_b. Seeded, so a report is reproducible.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000  # replicates: the 2.5 % / 97.5 % percentiles move by < 0.1 of the interval's width between seeds
LEVEL = 0.95


def bootstrap_weights(n_units: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n_units] multinomial counts: each row resamples the units with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
                    weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """(Σ num / Σ den, lower, upper) with the percentile interval over resampled units (rows of num/den may be
    stacked: num, den [..., n_units] give arrays of estimates)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    w = bootstrap_weights(num.shape[-1], n_boot, seed) if weights is None else weights
    point = num.sum(-1) / den.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (num @ w.T) / (den @ w.T)  # [..., n_boot]
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(reps, alpha, axis=-1), np.nanquantile(reps, 1 - alpha, axis=-1)
    return point, lo, hi


def bootstrap_mean(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
                   ) -> tuple[float, float, float]:
    """(mean, lower, upper) of per-unit values, resampling units."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_ratio(values, np.ones_like(values), n_boot, seed, level)


# Student's t 97.5 % quantiles for 1..30 degrees of freedom (the two-sided 95 % interval over few seeds)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_interval(values) -> tuple[float, float, float]:
    """(mean, lower, upper) of one effect measured once per seed: the 95 % Student-t interval
    mean ± t₀.₉₇₅(n−1) · s / √n (s the sample std; seeds are the independent units, and with 3–5 of them a
    bootstrap would only reshuffle the same few values). NaN bounds with fewer than two finite values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    df = len(x) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df
    half = t * float(x.std(ddof=1)) / np.sqrt(len(x))
    return mean, mean - half, mean + half
