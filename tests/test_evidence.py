"""`loopscope.evidence`: the exact binomial interval against published values, and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from loopscope.evidence import bootstrap_ratio, bootstrap_ratio_difference, clopper_pearson


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
