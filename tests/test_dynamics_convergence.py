"""successive_change, distance_to_fixed_point, cyclic_fixed_point_check on hand-computed inputs and a real LoopedLM."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope import LoopedConfig, LoopedLM, Trajectory
from loopscope import record as capture
from loopscope.dynamics import (
    cyclic_fixed_point_check,
    distance_to_fixed_point,
    max_final_relative_change,
    successive_change,
)
from loopscope.dynamics.synthetic import cyclic_system
from loopscope.errors import InputError


def tiny() -> Trajectory:
    """R=3, K=1, B=2, T=2, D=2; prompt 0 has one real token (its pad holds garbage), prompt 1 two."""
    core = torch.zeros(3, 1, 2, 2, 2, dtype=torch.float64)
    core[:, 0, 0, 0] = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    core[:, 0, 0, 1] = torch.tensor([[1e6, 5.0], [-3.0, 7.0], [float("nan"), 0.0]])  # padding
    core[:, 0, 1, 0] = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 3.0]])
    core[:, 0, 1, 1] = torch.tensor([[3.0, 4.0], [3.0, 4.0], [-3.0, -4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    return Trajectory(core=core, mask=mask)


def test_successive_change_hand_computed():
    df = successive_change(tiny())
    # the table dialect (loopscope.tables): state columns, v_mean / v_std (sample std) / n, as the stages tables
    assert list(df.columns)[:12] == ["segment", "recurrence", "layer", "depth", "relative_depth", "l2_mean", "l2_std",
                                     "relative_mean", "relative_std", "cosine_mean", "cosine_std", "n"]
    # one block layer, no prelude or coda, R = 3: recurrence t is at depth t + 1 of 3
    assert df["depth"].tolist() == [2, 3] and df["relative_depth"].tolist() == pytest.approx([2 / 3, 1.0])
    # token quantiles from log-histograms (±1.2 %): l2 at t=1 is [1, 2, 0] → median 1, at t=2 [√2, 0, 10] → √2
    assert df["l2_median"].tolist() == pytest.approx([1.0, math.sqrt(2)], rel=0.012)
    assert df["cosine_distance_median"].iloc[1] == pytest.approx(0.0, abs=1e-12)  # 1 − cos over [1, 1, −1]
    assert df["l2_q90"].iloc[1] == pytest.approx(10.0, rel=0.012)
    assert df["recurrence"].tolist() == [1, 2] and df["n"].tolist() == [3, 3]
    r1, r2 = df.iloc[0], df.iloc[1]
    # tokens (b0t0, b1t0, b1t1): l2 at t=1 = [1, 2, 0], at t=2 = [√2, 0, 10]
    # sample std (ddof = 1): of [1, 2, 0] it is 1 (the population std would be √(2/3))
    assert r1["l2_mean"] == pytest.approx(1.0) and r1["l2_std"] == pytest.approx(1.0)
    assert r2["l2_mean"] == pytest.approx((math.sqrt(2) + 10) / 3)
    assert r1["relative_mean"] == pytest.approx(1.0)  # [1/1, 2/1, 0/5]
    assert r2["relative_mean"] == pytest.approx(1.0)  # [√2/√2, 0/3, 10/5]
    assert r1["cosine_mean"] == pytest.approx((1 / math.sqrt(2) + 1 + 1) / 3)
    assert r2["cosine_mean"] == pytest.approx(1 / 3)  # [1, 1, -1]
    assert r2["cosine_std"] == pytest.approx(np.std([1, 1, -1], ddof=1))


def test_successive_change_per_token_excludes_padding():
    df = successive_change(tiny(), per_token=True)
    assert list(df.columns) == ["batch", "token", "recurrence", "layer", "l2", "relative", "cosine"]
    assert len(df) == 3 * 2  # three real tokens × two steps; the padding (with NaN) is absent
    assert set(zip(df["batch"], df["token"])) == {(0, 0), (1, 0), (1, 1)}
    row = df[(df.batch == 1) & (df.token == 1) & (df.recurrence == 2)].iloc[0]
    assert (row["l2"], row["relative"], row["cosine"]) == pytest.approx((10.0, 2.0, -1.0))
    assert np.isfinite(df[["l2", "relative", "cosine"]].to_numpy()).all()


def test_nonfinite_states_propagate_or_are_skipped():
    traj = tiny()
    traj.core[2, 0, 1, 1] = float("inf")
    df = successive_change(traj)
    assert not np.isfinite(df.iloc[1]["l2_mean"])  # divergence is not hidden by default
    kept = successive_change(traj, finite_only=True)
    assert kept.iloc[1]["n"] == 2 and kept.iloc[1]["l2_mean"] == pytest.approx(math.sqrt(2) / 2)
    assert kept.iloc[0]["n"] == 3  # t=1 is untouched


def test_distance_to_fixed_point_hand_computed():
    df = distance_to_fixed_point(tiny(), per_token=True)
    assert list(df.columns) == ["batch", "token", "recurrence", "layer", "l2", "cosine", "attention_frobenius"]
    tok = df[(df.batch == 0) & (df.token == 0)].sort_values("recurrence")
    assert tok["l2"].tolist() == pytest.approx([math.sqrt(5), math.sqrt(2), 0.0])
    assert tok["cosine"].tolist() == pytest.approx([1 / math.sqrt(2), 1.0, 1.0])
    assert df["attention_frobenius"].isna().all()  # no attention captured
    agg = distance_to_fixed_point(tiny())
    assert list(agg.columns)[:10] == ["segment", "recurrence", "layer", "depth", "relative_depth", "l2_mean", "l2_std",
                                      "cosine_mean", "cosine_std", "n"]
    assert list(agg.columns)[-2:] == ["attention_frobenius_mean", "attention_frobenius_std"]
    # t=0: token distances [√5, ‖(0,1)-(0,3)‖=2, ‖(3,4)-(-3,-4)‖=10]
    assert agg.iloc[0]["l2_mean"] == pytest.approx((math.sqrt(5) + 2 + 10) / 3)
    assert agg.iloc[0]["l2_std"] == pytest.approx(np.std([math.sqrt(5), 2, 10], ddof=1))
    assert agg.iloc[2]["l2_mean"] == 0.0 and agg.iloc[2]["cosine_mean"] == pytest.approx(1.0)


def test_distance_to_fixed_point_attention_against_loops():
    g = torch.Generator().manual_seed(1)
    R, K, B, H, T = 4, 2, 2, 3, 3
    attn = torch.rand(R, K, B, H, T, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    traj = Trajectory(core=torch.randn(R, K, B, T, 4, generator=g, dtype=torch.float64), mask=mask,
                      core_attention=attn)
    df = distance_to_fixed_point(traj)
    for t in range(R):
        for j in range(K):
            per_prompt = []
            for b in range(B):
                n = int(mask[b].sum())
                a = attn[t, j, b, :, :n, :n].mean(0) - attn[R - 1, j, b, :, :n, :n].mean(0)
                per_prompt.append(math.sqrt(sum(float(v) ** 2 for v in a.flatten())))
            cell = df[(df.recurrence == t) & (df.layer == j)]
            assert cell["attention_frobenius_mean"].item() == pytest.approx(sum(per_prompt) / B)
            assert cell["attention_frobenius_std"].item() == pytest.approx(float(np.std(per_prompt, ddof=1)))
    stacked = distance_to_fixed_point(traj, head_reduction="stack")
    a = attn[0, 1, 0, :, :2, :2] - attn[R - 1, 1, 0, :, :2, :2]
    b = attn[0, 1, 1] - attn[R - 1, 1, 1]
    expect = (a.norm() + b.norm()).item() / 2
    cell = stacked[(stacked.recurrence == 0) & (stacked.layer == 1)]
    assert cell["attention_frobenius_mean"].item() == pytest.approx(expect)


def test_needs_two_recurrences():
    with pytest.raises(InputError, match="at least 2 recurrences"):
        successive_change(Trajectory(core=torch.zeros(1, 1, 1, 1, 2)))


def contracting_block(K: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(K):
        W = 0.6 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
        b = torch.randn(D, generator=g, dtype=torch.float64)
        maps.append(lambda s, W=W, b=b: torch.tanh(s @ W.T + b))
    return maps


def test_cyclic_fixed_point_check_synthetic_cycle():
    maps = contracting_block(K=4, D=6, seed=0)
    x0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    core = cyclic_system(maps, x0, R=60)[:, :, None]  # [R, K, 1, n, D]
    traj = Trajectory(core=core)
    df = cyclic_fixed_point_check(traj)
    assert list(df.columns) == ["layer", "final_change", "final_relative_change", "max_relative_change"]
    assert len(df) == 4 and (df["max_relative_change"] < 1e-8).all()
    assert max_final_relative_change(traj) == pytest.approx(df["final_relative_change"].max())
    # and the per-layer fixed points are distinct (a cycle, not one point)
    assert (core[-1, 0] - core[-1, 1]).norm() > 0.1


def test_cyclic_fixed_point_check_flags_a_layer_that_moves():
    """A trajectory that violates Prop. 4.1 (not produced by a cyclic map): layer 0 still oscillates while the
    last layer sits still. The check must report layer 0's change, not average it away."""
    R, D = 10, 3
    core = torch.ones(R, 2, 1, 1, D, dtype=torch.float64)
    core[:, 0, 0, 0, 0] = torch.tensor([(-1.0) ** t for t in range(R)])  # ‖Δ‖ = 2, ‖x‖ = √3
    df = cyclic_fixed_point_check(Trajectory(core=core))
    assert df["final_change"].tolist() == pytest.approx([2.0, 0.0])
    assert max_final_relative_change(Trajectory(core=core)) == pytest.approx(2 / math.sqrt(3))


def test_proposition_4_1_on_a_random_looped_lm():
    """Prop. 4.1 on the spine's random-init LoopedLM (sandwich norm, concat injection, random initial state,
    weights seed 0 — 11 of these 12 tokens converge by R=64): wherever the last block layer's final relative
    change is < 1e-3, every block layer's is < 1e-2."""
    model = LoopedLM(LoopedConfig(norm="sandwich", injection="concat", state_init="random")).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    traj = capture(model, ids, recurrences=64)
    step = successive_change(traj, per_token=True)
    final = step[step.recurrence == 63].pivot_table(index=["batch", "token"], columns="layer", values="relative")
    last = final[traj.block_size - 1]
    converged = final[last < 1e-3]
    assert len(converged) >= 0.75 * len(final)  # the premise holds for most tokens: the check is not vacuous
    assert (converged.to_numpy() < 1e-2).all()
    assert max_final_relative_change(traj) < 1e-2


def test_non_contiguous_core_gives_the_same_tables():
    traj = tiny()
    strided = Trajectory(core=traj.core.transpose(2, 3).contiguous().transpose(2, 3), mask=traj.mask)
    assert not strided.core.is_contiguous()
    pd.testing.assert_frame_equal(successive_change(strided, per_token=True), successive_change(traj, per_token=True))


def test_stacked_heads_combine_by_root_sum_of_squares():
    """Two heads whose patterns move by 3 and 4 (Frobenius) between recurrence 0 and the last: stacked, the
    distance is √(3² + 4²) = 5, not 3 + 4; head-averaged it is ‖(Δ₀ + Δ₁)/2‖ (here the moves are orthogonal)."""
    R, T = 2, 3
    attn = torch.zeros(R, 1, 1, 2, T, T, dtype=torch.float64)
    attn[0, 0, 0, 0, 0, 0] = 3.0  # head 0: one entry differs by 3 from the last recurrence's
    attn[0, 0, 0, 1, 1, 1] = 4.0  # head 1: another entry differs by 4
    traj = Trajectory(core=torch.randn(R, 1, 1, T, 4, dtype=torch.float64), core_attention=attn)
    stack = distance_to_fixed_point(traj, head_reduction="stack")
    first = stack[stack.recurrence == 0]["attention_frobenius_mean"].item()
    assert first == pytest.approx(5.0)
    avg = distance_to_fixed_point(traj, head_reduction="average")
    assert avg[avg.recurrence == 0]["attention_frobenius_mean"].item() == pytest.approx(2.5)  # ‖(3e₀₀ + 4e₁₁)/2‖


def test_cyclic_check_reports_the_worst_token_not_the_mean():
    """One of four tokens still flips at layer 0 (relative step 2/√3): `max_relative_change` must show it whole;
    the mean over tokens (`final_relative_change`) dilutes it fourfold, which is why Prop. 4.1 reads the max."""
    R, D = 10, 3
    core = torch.ones(R, 2, 1, 4, D, dtype=torch.float64)
    core[:, 0, 0, 2, 0] = torch.tensor([(-1.0) ** t for t in range(R)])
    df = cyclic_fixed_point_check(Trajectory(core=core))
    assert df["max_relative_change"].tolist() == pytest.approx([2 / math.sqrt(3), 0.0])
    assert df["final_relative_change"].tolist() == pytest.approx([2 / math.sqrt(3) / 4, 0.0])
