"""residual_similarity and attention_distance against direct loops; mask handling; errors."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from loopscope import Trajectory
from loopscope.dynamics import attention_distance, distance_to_fixed_point, residual_similarity
from loopscope.errors import InputError

R, K, B, T, D, H = 3, 2, 2, 4, 5, 2


def make() -> Trajectory:
    g = torch.Generator().manual_seed(0)
    core = torch.randn(R, K, B, T, D, generator=g, dtype=torch.float64)
    attn = torch.rand(R, K, B, H, T, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    core[:, :, 0, 3] = 1e6  # padding garbage
    attn[:, :, 0, :, 3, :] = 50.0
    attn[:, :, 0, :, :, 3] = -50.0
    return Trajectory(core=core, core_attention=attn, mask=mask)


def test_residual_similarity_matches_loops():
    traj = make()
    S = residual_similarity(traj)
    assert S.shape == (R * K, R * K)
    assert list(S.index) == [(t, j) for t in range(R) for j in range(K)]  # realized order
    assert S.index.names == ["recurrence", "layer"] and S.columns.equals(S.index)
    real = [(b, t) for b in range(B) for t in range(T) if traj.mask[b, t]]
    for (t1, j1) in [(0, 0), (1, 1), (2, 0)]:
        for (t2, j2) in [(0, 1), (2, 1), (1, 0)]:
            expect = sum(F.cosine_similarity(traj.core[t1, j1, b, t], traj.core[t2, j2, b, t], dim=0).item()
                         for b, t in real) / len(real)
            assert S.loc[(t1, j1), (t2, j2)] == pytest.approx(expect, abs=1e-12)
    assert torch.diagonal(torch.tensor(S.to_numpy())).tolist() == pytest.approx([1.0] * (R * K))


def test_residual_similarity_first_recurrences_and_finite_only():
    traj = make()
    S2 = residual_similarity(traj, recurrences=2)
    assert S2.shape == (2 * K, 2 * K)
    pd.testing.assert_frame_equal(S2, residual_similarity(traj).iloc[: 2 * K, : 2 * K])
    traj.core[2, 0, 1, 2] = float("nan")
    assert residual_similarity(traj).isna().any().any()
    kept = residual_similarity(traj, finite_only=True)
    assert not kept.isna().any().any()
    with pytest.raises(InputError, match="recurrences=4"):
        residual_similarity(traj, recurrences=4)


def test_attention_distance_matches_loops():
    traj = make()
    A = attention_distance(traj)
    assert A.shape == (R * K, R * K) and list(A.index) == [(t, j) for t in range(R) for j in range(K)]
    attn = traj.core_attention
    for (t1, j1), (t2, j2) in [((0, 0), (0, 1)), ((1, 1), (2, 0)), ((2, 1), (2, 1))]:
        per_prompt = []
        for b in range(B):
            n = int(traj.mask[b].sum())
            diff = attn[t1, j1, b, :, :n, :n] - attn[t2, j2, b, :, :n, :n]
            per_prompt.append(float((diff ** 2).sum()) ** 0.5)
        assert A.loc[(t1, j1), (t2, j2)] == pytest.approx(sum(per_prompt) / B, abs=1e-10)
    assert (A.to_numpy() >= 0).all() and A.to_numpy() == pytest.approx(A.to_numpy().T)


def test_attention_average_agrees_with_distance_to_fixed_point():
    """The head-averaged variant of attention_distance, read at (t, j) vs (R-1, j), equals
    distance_to_fixed_point's attention column: two code paths, one definition."""
    traj = make()
    A = attention_distance(traj, head_reduction="average")
    df = distance_to_fixed_point(traj)
    for t in range(R):
        for j in range(K):
            value = df[(df.recurrence == t) & (df.layer == j)]["attention_frobenius_mean"].item()
            assert value == pytest.approx(A.loc[(t, j), (R - 1, j)], abs=1e-10)


def test_attention_distance_needs_attention():
    traj = Trajectory(core=torch.zeros(2, 1, 1, 2, 3))
    with pytest.raises(InputError, match="attention=True"):
        attention_distance(traj)
    with pytest.raises(InputError, match="head_reduction"):
        attention_distance(make(), head_reduction="max")
