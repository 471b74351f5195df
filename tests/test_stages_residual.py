"""Residual norms, massive activations and matrix entropy on constructed states."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.stages import matrix_entropy, residual_entropy, residual_norms


def test_planted_spike_is_found_and_padding_is_ignored():
    T, D = 4, 5
    x = torch.ones(2, T, D)
    x[:, :, 1::2] = -1.0  # |x| = 1 everywhere
    x[0, 2, 3] = 1000.0  # the spike in prompt 0, token 2, dim 3
    x[1, 3, 0] = 5000.0  # prompt 1: on a padding token, must be ignored
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    traj = Trajectory(core=x[None, None], mask=mask)
    raw = residual_norms(traj, per_prompt=True)
    p0, p1 = raw.iloc[0], raw.iloc[1]
    assert p0.max_abs_activation == pytest.approx(1000.0)
    assert p0.median_abs_activation == pytest.approx(1.0)
    assert p0.massive_activation_ratio == pytest.approx(1000.0)
    assert (p0.massive_token, p0.massive_dim) == (2, 3)
    assert p0.first_token_norm == pytest.approx(math.sqrt(5))
    assert p0.token_norm_max == pytest.approx(math.sqrt(4 + 1000.0**2))
    assert p0.token_norm_mean == pytest.approx((3 * math.sqrt(5) + math.sqrt(4 + 1e6)) / 4)
    assert p1.max_abs_activation == pytest.approx(1.0)
    assert p1.massive_activation_ratio == pytest.approx(1.0)
    assert p1.n_tokens == 3
    summary = residual_norms(traj)
    assert summary.max_abs_activation_mean.iloc[0] == pytest.approx(500.5)
    assert summary.max_abs_activation_std.iloc[0] == pytest.approx(math.sqrt(2) * 499.5)
    assert int(summary.n.iloc[0]) == 2


def test_matrix_entropy_rank_one_is_zero():
    torch.manual_seed(0)
    u = torch.randn(6, dtype=torch.float64)
    x = torch.outer(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64), u)
    h, h_norm = matrix_entropy(x)
    assert h == pytest.approx(0.0, abs=1e-9)
    assert h_norm == pytest.approx(0.0, abs=1e-9)


def test_matrix_entropy_orthonormal_rows_is_one():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 5, dtype=torch.float64))
    h, h_norm = matrix_entropy(q.T)  # 5 orthonormal rows in R^8
    assert h == pytest.approx(math.log(5))
    assert h_norm == pytest.approx(1.0)


def test_matrix_entropy_unequal_orthogonal_rows_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.sqrt(3), 0.0]])  # λ = (1/4, 3/4)
    h, h_norm = matrix_entropy(x)
    assert h == pytest.approx(0.5623351, abs=1e-6)
    assert h_norm == pytest.approx(0.8112781, abs=1e-6)


def test_residual_entropy_uses_each_prompts_real_tokens_only():
    torch.manual_seed(2)
    T, D = 5, 6
    states = torch.randn(1, 1, 2, T, D)
    states[0, 0, 1, :3] = torch.outer(torch.tensor([1.0, 2.0, -1.0]), torch.randn(D))  # real tokens: rank 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    raw = residual_entropy(Trajectory(core=states, mask=mask), per_prompt=True)
    assert raw.matrix_entropy_normalised.iloc[1] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < raw.matrix_entropy_normalised.iloc[0] <= 1.0  # 5 random rows in R^6 are far from rank 1
    expected = matrix_entropy(states[0, 0, 0])[1]
    assert raw.matrix_entropy_normalised.iloc[0] == pytest.approx(expected)


def test_massive_onset_is_the_layer_that_writes_them_not_a_later_recurrence():
    """Peaks (hand-made): the prelude's layer 2 steps up 1 → 100; the loop then keeps growing them (110 … 500).
    Half the overall maximum (250) would name core layer 1 at recurrence 1; the onset is the first state reaching
    half the first pass's maximum (½ · 120): prelude layer 2. A feedforward stack (one pass) keeps ½ · max."""
    from loopscope.stages import massive_activation_profile

    states = [("embed", 0, 0, 0.5)] + [("prelude", 0, j, p) for j, p in enumerate([1.0, 1.0, 100.0, 100.0])]
    states += [("core", t, j, p) for t, pair in enumerate([(110.0, 120.0), (200.0, 300.0), (400.0, 500.0)])
               for j, p in enumerate(pair)] + [("coda", 0, 0, 480.0)]
    norms = pd.DataFrame([{"segment": s, "recurrence": t, "layer": j, "depth": i, "max_abs_activation_mean": p,
                           "median_abs_activation_mean": 1.0} for i, (s, t, j, p) in enumerate(states)])
    onset = massive_activation_profile(norms).query("onset").iloc[0]
    assert (onset.segment, onset.layer, onset.recurrence) == ("prelude", 2, 0) and onset.growth == 100.0
    ff = norms[norms.segment.isin(["embed", "core"])].assign(segment=lambda d: d.segment.where(d.segment == "embed",
                                                                                               "core"))
    ff = ff.assign(recurrence=0, layer=range(len(ff)))  # one pass of 7 layers: 0.5, 110, 120, 200, 300, 400, 500
    onset = massive_activation_profile(ff).query("onset").iloc[0]
    assert onset.layer == 4  # 300 ≥ ½ · 500


def test_residual_entropy_spectra_taken_in_chunks_match_one_stack(monkeypatch):
    """The Gram spectra are taken per prompt at the end of a batch, or `gram_bytes` at a time: the same table, and a
    non-finite or all-zero state still gives NaN."""
    from loopscope.stages.compression import ResidualEntropy

    torch.manual_seed(4)
    states = torch.randn(3, 2, 2, 5, 4)
    states[1, 0, 0, 2, 1] = float("inf")
    states[2, 1, 1] = 0.0
    traj = Trajectory(core=states, mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool))
    whole = residual_entropy(traj, per_prompt=True)
    monkeypatch.setattr(ResidualEntropy, "gram_bytes", 1)
    pd.testing.assert_frame_equal(residual_entropy(traj, per_prompt=True), whole, check_exact=True)
    nan = whole.matrix_entropy.isna()
    assert nan.sum() == 2 and whole[nan].batch.tolist() == [0, 1]


def test_median_is_numpys():
    from loopscope.stages.residual import numpy_median

    for v in ([3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [1.0, float("nan"), 2.0], [0.0, 0.0, 1.0, 5.0]):
        got, want = float(numpy_median(torch.tensor(v, dtype=torch.float64))), float(np.median(v))
        assert got == want or (math.isnan(got) and math.isnan(want))
