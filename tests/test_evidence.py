"""`loopscope.evidence`: the exact binomial interval and the seeds' Student-t interval against published values, and
the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from loopscope.evidence import bootstrap_ratio, bootstrap_ratio_difference, clopper_pearson, seed_interval


@pytest.mark.parametrize("k, n, lo, hi", [
    (5, 100, 0.016431879, 0.112834911),  # R: binom.test(5, 100)$conf.int
    (50, 100, 0.398321130, 0.601678870),  # binom.test(50, 100)
    (1, 10, 0.002528579, 0.445016117),  # binom.test(1, 10)
])
def test_clopper_pearson_matches_published_values(k, n, lo, hi):
    got = clopper_pearson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-8)


def test_clopper_pearson_at_the_edges_has_closed_forms():
    # 0 events: upper = 1 − (α/2)^(1/n) (the "rule of 3.7"); n events: lower = (α/2)^(1/n)
    assert clopper_pearson(0, 1000) == pytest.approx((0.0, 1 - 0.025 ** (1 / 1000)), abs=1e-10)
    assert clopper_pearson(20, 20) == pytest.approx((0.025 ** (1 / 20), 1.0), abs=1e-10)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_paired_bootstrap_cancels_what_the_units_share():
    rng = np.random.default_rng(1)
    n = np.full(30, 100.0)
    a = rng.integers(0, 40, size=30).astype(float)  # units differ a lot in their own rate
    b = a + 2.0  # b adds two events to every unit
    d, lo, hi = bootstrap_ratio_difference(b, n, a, n)
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    # resampled apart (unpaired), the same two rates overlap: the unit-to-unit spread does not cancel
    _, lo_b, hi_b = bootstrap_ratio(b, n, seed=0)
    _, lo_a, hi_a = bootstrap_ratio(a, n, seed=1)
    assert lo_b < hi_a
    with pytest.raises(ValueError):
        bootstrap_ratio_difference(a, n, a[:-1], n[:-1])


# Student's t 0.975 quantiles, df = 1..30, as printed in the standard tables (e.g. NIST/SEMATECH e-Handbook of
# Statistical Methods, §1.3.6.7.2; R: qt(0.975, df)), typed here independently of loopscope.evidence.T975
PUBLISHED_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                  10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
                  19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056,
                  27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("df", sorted(PUBLISHED_T975))
def test_seed_interval_uses_the_published_t_quantile_for_n_minus_one_degrees_of_freedom(df):
    """n = df + 1 seeds: the half-width is t₀.₉₇₅(n − 1) · s / √n with s the sample (n − 1) std, so the quantile it
    used is (upper − mean)·√n / s; an off-by-one in df or in the std's divisor moves it off the table."""
    values = np.random.default_rng(df).normal(3.0, 2.0, size=df + 1)
    mean, lo, hi = seed_interval(values)
    s = float(np.std(values, ddof=1))
    assert mean == pytest.approx(float(values.mean()))
    assert (hi - mean) * np.sqrt(df + 1) / s == pytest.approx(PUBLISHED_T975[df], abs=1.5e-3 if df > 30 else 5e-4)
    assert mean - lo == pytest.approx(hi - mean)


def test_seed_interval_needs_two_finite_values():
    mean, lo, hi = seed_interval([1.5, float("nan"), None])
    assert mean == 1.5 and np.isnan(lo) and np.isnan(hi)
    assert seed_interval([1.0, None, 3.0])[2] == pytest.approx(2.0 + 12.706 * np.sqrt(2) / np.sqrt(2))
