"""Chunking over tokens must not change any result: every analysis, one token per chunk vs one chunk."""

import pandas as pd
import torch

import loopscope.dynamics._tokens as tokens_module
from loopscope import Trajectory
from loopscope.dynamics import (
    classify,
    cooccurrence,
    cyclic_fixed_point_check,
    degeneracy,
    distance_to_fixed_point,
    residual_similarity,
    successive_change,
)
from loopscope.dynamics.synthetic import contraction, drift, rotation, trajectory_from_tokens


def sample() -> Trajectory:
    R, D = 16, 4
    states = [torch.stack([contraction(R, D, seed=s), rotation(R, D, 3, seed=s), drift(R, D, 1.0, seed=s)], 1)
              for s in range(5)]
    traj = trajectory_from_tokens([states[:2], states[2:]])  # prompt 0 padded: gather path
    traj.core[:, :, 0, 2] = float("nan")
    return traj


ANALYSES = {
    "successive": lambda t: successive_change(t),
    "successive_per_token": lambda t: successive_change(t, per_token=True),
    "fixed_point": lambda t: distance_to_fixed_point(t, per_token=True),
    "check": cyclic_fixed_point_check,
    "degeneracy": degeneracy,
    "classify": lambda t: classify(t, layer=1),
    "paper": lambda t: classify(t, layer=2, method="paper", window_start=0.25),
    "cooccurrence": cooccurrence,
    "similarity": residual_similarity,
}


def test_one_token_per_chunk_equals_one_chunk(monkeypatch):
    traj = sample()
    whole = {name: f(traj) for name, f in ANALYSES.items()}
    monkeypatch.setattr(tokens_module, "CHUNK_ELEMENTS", 1)
    for name, f in ANALYSES.items():
        pd.testing.assert_frame_equal(f(traj), whole[name], check_exact=False, rtol=1e-12, obj=name)
    assert (whole["classify"]["behaviour"] == "orbit").all()  # layer 1 holds the rotations: non-trivial labels
