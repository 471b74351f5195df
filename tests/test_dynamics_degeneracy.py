"""degeneracy / degeneracy_summary on cyclic systems with a distinct cycle, one shared point, or no fixed point."""

import math

import pytest
import torch

from loopscope import Trajectory
from loopscope.dynamics import degeneracy, degeneracy_summary
from loopscope.dynamics.synthetic import cyclic_system

K, D, R, N = 3, 6, 40, 4


def run(maps) -> Trajectory:
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return Trajectory(core=cyclic_system(maps, x0, R)[:, :, None])  # [R, K, 1, N, D]


def distinct_cycle():
    """f_j(s) = 0.5 s + b_j with distinct offsets: the block's fixed point gives each layer its own point."""
    g = torch.Generator().manual_seed(0)
    offsets = [3 * torch.randn(D, generator=g, dtype=torch.float64) for _ in range(K)]
    return [lambda s, b=b: 0.5 * s + b for b in offsets]


def shared_point():
    """f_j(s) = c + λ_j (s − c): every layer contracts to the same point c."""
    c = torch.linspace(1, 2, D, dtype=torch.float64)
    return [lambda s, lam=lam: c + lam * (s - c) for lam in (0.5, 0.3, 0.6)]


def rotating():
    """Each layer rotates the (0, 1) plane by 0.4 rad: the block rotates by 1.2 rad forever."""
    angle = 0.4
    rot = torch.eye(D, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [lambda s: s @ rot.T] * K


def test_distinct_cyclic_fixed_point():
    traj = run(distinct_cycle())
    df = degeneracy(traj)
    assert list(df.columns) == ["batch", "token", "min_cosine_to_first", "converged", "verdict"]
    assert df["converged"].all() and (df["min_cosine_to_first"] < 0.99).all()
    assert set(df["verdict"]) == {"distinct cyclic fixed point"}
    # independent computation of the statistic for token 0
    star = traj.core[-1, :, 0, 0]
    expect = min(torch.nn.functional.cosine_similarity(star[0], star[j], dim=0).item() for j in range(1, K))
    assert df.loc[0, "min_cosine_to_first"] == pytest.approx(expect)


def test_degenerate_fixed_point():
    df = degeneracy(run(shared_point()))
    assert df["min_cosine_to_first"].tolist() == pytest.approx([1.0] * N)
    assert set(df["verdict"]) == {"degenerate fixed point"}


def test_no_fixed_point():
    df = degeneracy(run(rotating()))
    assert not df["converged"].any()
    assert set(df["verdict"]) == {"no fixed point"}


def test_summary_counts_and_majority():
    a, b = run(distinct_cycle()), run(rotating())
    mixed = Trajectory(core=torch.cat([a.core, b.core[:, :, :, :1]], dim=3))  # 4 distinct + 1 rotating
    s = degeneracy_summary(mixed)
    assert list(s.columns) == ["min_cosine_to_first_mean", "min_cosine_to_first_min", "fraction_distinct_cyclic",
                               "fraction_degenerate", "fraction_no_fixed_point", "verdict", "n"]
    row = s.iloc[0]
    assert (row["fraction_distinct_cyclic"], row["fraction_degenerate"], row["fraction_no_fixed_point"]) == \
        pytest.approx((0.8, 0.0, 0.2))
    assert row["verdict"] == "distinct cyclic fixed point" and row["n"] == 5
    per = degeneracy(mixed)["min_cosine_to_first"]
    assert row["min_cosine_to_first_min"] == pytest.approx(per.min())
    assert degeneracy_summary(run(shared_point())).iloc[0]["verdict"] == "degenerate fixed point"


def test_tolerances_are_used_and_nonfinite_is_no_fixed_point():
    traj = run(distinct_cycle())
    assert set(degeneracy(traj, tol=-1.0)["verdict"]) == {"degenerate fixed point"}  # every cosine ≥ -1
    assert set(degeneracy(traj, converge_tol=0.0)["verdict"]) == {"no fixed point"}
    traj.core[-1, 0, 0, 1, 0] = float("nan")
    df = degeneracy(traj)
    assert df.loc[1, "verdict"] == "no fixed point" and not df.loc[1, "converged"]


def test_convergence_is_read_off_the_last_block_layer():
    """Layer 0 still flips while layer 1 (the last) sits still → converged (Prop. 4.1 reads the last layer); the
    other way round → no fixed point. A check reading layer 0, or any other fixed layer, gets one of them wrong."""
    R, D = 12, 3
    flip = torch.tensor([(-1.0) ** t for t in range(R)], dtype=torch.float64)
    for moving, want in ((0, True), (1, False)):
        core = torch.ones(R, 2, 1, 1, D, dtype=torch.float64)
        core[:, 1, 0, 0, 1] = 5.0  # the two layers' points differ: distinct when converged
        core[:, moving, 0, 0, 0] = flip
        df = degeneracy(Trajectory(core=core))
        assert bool(df["converged"].iloc[0]) is want, moving
        assert df["verdict"].iloc[0] == ("distinct cyclic fixed point" if want else "no fixed point")
