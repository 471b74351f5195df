"""cooccurrence: behaviours across block layers on one token (Fig. 14), on a hand-assembled mix."""

import torch

from loopscope.dynamics import BEHAVIOURS, classify, cooccurrence
from loopscope.dynamics.synthetic import contraction, drift, expansion, rotation, trajectory_from_tokens

R, D = 64, 8


def token(*layers: torch.Tensor) -> torch.Tensor:
    return torch.stack(layers, dim=1)  # [R, K, D]


def test_cooccurrence_counts():
    noise = torch.randn(R, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens = [
        token(contraction(R, D, seed=1), contraction(R, D, seed=2), rotation(R, D, 3)),  # fixed ×2, orbit
        token(drift(R, D, speed=1.0), contraction(R, D, seed=3), noise),  # slider, fixed, unknown
        token(expansion(R, D), expansion(R, D, seed=4), contraction(R, D, seed=5)),  # divergent ×2, fixed
        token(rotation(R, D, 2), rotation(R, D, 5), rotation(R, D, 7)),  # orbit ×3
    ]
    traj = trajectory_from_tokens([tokens[:3], tokens[3:]])
    traj.core[:, :, 1, 1:] = float("nan")  # padding of prompt 1: would add divergent tokens if counted
    expected = {j: classify(traj, layer=j)["behaviour"].tolist() for j in range(3)}
    assert expected == {0: ["fixed_point", "slider", "divergent", "orbit"],
                        1: ["fixed_point", "fixed_point", "divergent", "orbit"],
                        2: ["orbit", "unknown", "fixed_point", "orbit"]}
    M = cooccurrence(traj)
    assert list(M.index) == list(BEHAVIOURS) and list(M.columns) == list(BEHAVIOURS)
    want = {("fixed_point", "orbit"): 1, ("fixed_point", "slider"): 1, ("fixed_point", "unknown"): 1,
            ("slider", "unknown"): 1, ("fixed_point", "divergent"): 1,
            ("fixed_point", "fixed_point"): 1, ("orbit", "orbit"): 1, ("divergent", "divergent"): 1}
    for a in BEHAVIOURS:
        for b in BEHAVIOURS:
            count = want.get((a, b), want.get((b, a), 0))
            assert M.loc[a, b] == count, (a, b)
    assert M.loc["orbit", "slider"] == 0
