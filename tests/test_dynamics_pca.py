"""pca_trajectory: a planar rotation's PC1–2 recover the circle."""

import math

import pytest
import torch

from loopscope.dynamics import pca_trajectory
from loopscope.dynamics.synthetic import rotation, trajectory_from_tokens
from loopscope.errors import InputError

R, D = 24, 10


def test_rotation_recovers_the_circle():
    circle = rotation(R, D, period=8, radius=2.0, offset=3.0, seed=1)  # 3 full turns: centred on the centre
    garbage = torch.randn(R, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    traj = trajectory_from_tokens([[garbage, circle], [garbage, garbage, garbage]], dtype=torch.float64)
    traj.core[:, :, 0, 2] = 1e9  # padding after the circle: token=-1 must pick the last REAL token
    proj, var = pca_trajectory(traj, batch=0, token=-1)
    assert list(proj.columns) == ["recurrence", "layer", "depth", "pc1", "pc2", "pc3", "pc4", "pc5", "pc6"]
    assert list(var.columns) == ["component", "explained_variance_ratio"]
    assert var["component"].tolist() == [1, 2, 3, 4, 5, 6]
    radius = (proj["pc1"] ** 2 + proj["pc2"] ** 2).pow(0.5)
    assert radius.tolist() == pytest.approx([2.0] * R, abs=1e-9)
    assert proj[["pc3", "pc4", "pc5", "pc6"]].abs().max().max() < 1e-9
    ratio = var["explained_variance_ratio"].tolist()
    assert ratio == sorted(ratio, reverse=True) and sum(ratio) <= 1 + 1e-12
    assert ratio[0] + ratio[1] == pytest.approx(1.0)
    # consecutive states are 2π/8 apart on the circle
    angle = torch.atan2(torch.tensor(proj["pc2"].to_numpy()), torch.tensor(proj["pc1"].to_numpy()))
    step = torch.remainder(angle[1:] - angle[:-1], 2 * math.pi)
    step = torch.minimum(step, 2 * math.pi - step)
    assert step.tolist() == pytest.approx([2 * math.pi / 8] * (R - 1), abs=1e-9)
    # the same token addressed by position
    same, _ = pca_trajectory(traj, batch=0, token=1)
    assert same["pc1"].tolist() == pytest.approx(proj["pc1"].tolist())


def test_depth_order_with_several_layers_and_nonfinite_rows():
    states = torch.stack([rotation(R, D, 6, seed=2), rotation(R, D, 6, seed=3)], dim=1)  # [R, K=2, D]
    traj = trajectory_from_tokens([[states]], dtype=torch.float64)
    traj.core[5, 1, 0, 0, 0] = float("inf")
    proj, var = pca_trajectory(traj, n_components=3)
    assert proj["depth"].tolist() == list(range(1, 2 * R + 1))  # no prelude: depth = t·K + j + 1
    assert proj[["recurrence", "layer"]].iloc[3].tolist() == [1, 1]
    assert proj[["pc1", "pc2", "pc3"]].iloc[5 * 2 + 1].isna().all()
    assert proj[["pc1", "pc2", "pc3"]].drop(index=11).notna().all().all()
    assert len(var) == 3 and var["explained_variance_ratio"].sum() <= 1 + 1e-12


def test_padding_token_is_refused():
    traj = trajectory_from_tokens([[rotation(R, D, 3)], [rotation(R, D, 3), rotation(R, D, 3)]])
    with pytest.raises(InputError, match="padding"):
        pca_trajectory(traj, batch=0, token=1)
