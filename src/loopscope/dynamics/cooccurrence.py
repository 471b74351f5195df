"""Which behaviours appear together on one token across the block's layers (Blayney et al. 2026 App. C.2,
Fig. 14: orbits and sliders never co-occur on one token; both often co-occur with fixed points)."""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics.behaviour import BehaviourStats, collect, thresholds_for
from loopscope.dynamics.rule_dynamics import BEHAVIOURS


def cooccurrence_from(stats: BehaviourStats, method: str = "dynamics", **thresholds: object) -> pd.DataFrame:
    """The co-occurrence matrix (see `cooccurrence`) from collected statistics of every block layer."""
    codes = torch.stack([stats.labels(j, method, **thresholds).code for j in range(stats.block_size)])  # [K, N]
    counts = torch.nn.functional.one_hot(codes, len(BEHAVIOURS)).sum(0)  # [N, 5] layers per behaviour
    present = (counts > 0).long()
    matrix = present.T @ present  # tokens with both a and b (a ≠ b: necessarily at different layers)
    matrix.diagonal().copy_((counts >= 2).long().sum(0))
    index = pd.Index(BEHAVIOURS, name="behaviour")
    return pd.DataFrame(matrix.numpy(), index=index, columns=index.copy())


def cooccurrence(traj: Trajectory, method: str = "dynamics", **thresholds: object) -> pd.DataFrame:
    """Classify every block layer j = 0..K-1 for every real token (`classify(traj, layer=j, method)`), then count

        cell (a, b), a ≠ b: tokens that have behaviour a at some block layer and b at another block layer
        cell (a, a):        tokens that have behaviour a at two or more block layers (a single layer with a
                            does not count: the diagonal follows the same "some layer and another layer" rule)

    Square, symmetric DataFrame of int64 counts; index and columns are BEHAVIOURS in the order
    fixed_point, orbit, slider, divergent, unknown (both named "behaviour").
    """
    thresholds_for(method, thresholds)
    return cooccurrence_from(collect(traj, None, (method,), **thresholds), method, **thresholds)
