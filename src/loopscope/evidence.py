"""Uncertainty for every number a verdict or a sweep rests on: percentile bootstrap intervals over prompts.

A rate over tokens (non-fixed-point tokens / tokens) is a ratio of per-prompt sums, so prompts — not tokens — are the
independent units: tokens of one prompt share its context. `bootstrap_ratio` resamples prompts with replacement
(Efron & Tibshirani 1993, §13.3 percentile interval): each replicate weights prompt b by its multinomial count w_b and
takes Σ w_b·num_b / Σ w_b·den_b. Seeded, so a report is reproducible.
"""

from __future__ import annotations

import math

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


def bootstrap_ratio_difference(num_a, den_a, num_b, den_b, n_boot: int = N_BOOT, seed: int = 0,
                               level: float = LEVEL) -> tuple[float, float, float]:
    """(Σ num_a / Σ den_a − Σ num_b / Σ den_b, lower, upper): a paired percentile bootstrap over units measured
    under both a and b (the same prompts under two conditions): each replicate resamples the units once and takes
    both ratios with the same weights, so what the units share cancels from the difference."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("a paired bootstrap needs the same units under both conditions")
    num_a, den_a, num_b, den_b = arrays
    w = bootstrap_weights(num_a.shape[-1], n_boot, seed)
    point = num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (w @ num_a) / (w @ den_a) - (w @ num_b) / (w @ den_b)
    alpha = (1 - level) / 2
    return float(point), float(np.nanquantile(reps, alpha)), float(np.nanquantile(reps, 1 - alpha))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed in log space (exact to float64 rounding)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma(n + 1)
    terms = [lg - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact binomial interval for k events in n trials (Clopper & Pearson 1934): the lower bound p_l solves
    P(X ≥ k; p_l) = α/2 and the upper p_u solves P(X ≤ k; p_u) = α/2, α = 1 − level (0 and 1 at the edges; solved by
    bisection to 1e-12). Unlike a bootstrap it does not collapse to [0, 0] when no event was seen: 0 of n gives
    an upper bound of 1 − (α/2)^(1/n) ≈ 3.7 / n."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"clopper_pearson needs 0 ≤ k ≤ n, n ≥ 1 (got k={k}, n={n})")
    alpha = (1 - level) / 2

    def solve(j: int, target: float) -> float:  # P(X ≤ j; p) falls with p: the p where it equals target
        lo, hi = 0.0, 1.0
        while hi - lo > 1e-12:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _binomial_cdf(j, n, mid) > target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(k - 1, 1.0 - alpha)  # P(X ≥ k) = 1 − P(X ≤ k − 1) = α/2
    upper = 1.0 if k == n else solve(k, alpha)
    return lower, upper
