"""Residual-stream magnitude and massive activations, per state, on each prompt's real tokens.

For a state X ∈ R^{T×D} of one prompt (real tokens only, rows x_i):

- token norms ‖x_i‖₂: `token_norm_mean` = (1/T) Σ_i ‖x_i‖, `token_norm_max` = max_i ‖x_i‖, and
  `first_token_norm` = ‖x_0‖ (the BOS / first token, whose norm blows up with massive activations;
  Queipo-de-Llano et al. 2025 "BOS token norm"; Blayney et al. 2026 §3.5 and Fig. 9 "residual magnitude").
- massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): the largest
  magnitude over tokens and dimensions `max_abs_activation` = max_{i,d} |X_id|, the median magnitude
  `median_abs_activation` = median_{i,d} |X_id| (numpy median: mean of the two middle values for an even
  count), and their ratio `massive_activation_ratio` (Sun et al. call activations ~10³–10⁴× the median
  "massive"; inf when the median is 0). Per prompt, `massive_token` / `massive_dim` locate the maximum
  (token index among the real tokens).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows

RESIDUAL_METRICS = [
    "token_norm_mean", "token_norm_max", "first_token_norm", "max_abs_activation", "median_abs_activation",
    "massive_activation_ratio",
]


def residual_magnitudes(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """All metrics of this module for one prompt's states x: (T, D), real tokens only, as 0-d tensors on x's device
    (float64; `massive_token`, `massive_dim` int64)."""
    x = x.double()
    norms = x.norm(dim=-1)
    mags = x.abs().flatten()
    flat = mags.argmax()  # the first maximum, or the first NaN, as np.argmax
    peak = mags[flat]
    median = numpy_median(mags)
    return {
        "token_norm_mean": norms.mean(),
        "token_norm_max": norms.max(),
        "first_token_norm": norms[0],
        "max_abs_activation": peak,
        "median_abs_activation": median,
        "massive_activation_ratio": torch.where(median > 0, peak / median, float("inf")),
        "massive_token": flat // x.shape[1],
        "massive_dim": flat % x.shape[1],
    }


def numpy_median(v: torch.Tensor) -> torch.Tensor:
    """np.median of a 1-D tensor, on its device: the middle value, the mean of the two middle values for an even
    count (torch.median takes the lower one), NaN when any value is NaN."""
    n = v.numel()
    middle = v.kthvalue(n // 2 + 1).values
    if n % 2 == 0:
        middle = (v.kthvalue(n // 2).values + middle) / 2
    return torch.where(torch.isnan(v).any(), float("nan"), middle)


class ResidualNorms(PromptRows):
    """`residual_magnitudes` of every state and prompt, as each state is produced (on its device; the batch's values
    reach the host once, in `end`)."""

    name = "residual_norms"
    values = RESIDUAL_METRICS
    int_columns = ["massive_token", "massive_dim"]
    sites = frozenset({"resid_post", "embed"})

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if not self.wants(site, step):
            return
        ids = self.ids(step)
        for b, prompt, pos, xb in self.prompts(x):
            metrics = residual_magnitudes(xb)
            self.record([{**ids, "batch": prompt, "n_tokens": len(pos)}],
                        torch.stack([metrics[c].double() for c in self.columns]))


def residual_norms(traj: Trajectory, *, per_prompt: bool = False, include_embed: bool = False) -> pd.DataFrame:
    """Residual magnitude and massive-activation metrics for every state (optionally the embedding too).

    Columns: STATE_COLUMNS and, for m in RESIDUAL_METRICS, `m_mean`, `m_std` (over prompts) and `n`
    (prompts). per_prompt=True returns the raw rows: STATE_COLUMNS, `batch`, `n_tokens`, the metrics,
    `massive_token`, `massive_dim`.
    """
    return run_on_trajectory(ResidualNorms(["batch"], raw=per_prompt, include_embed=include_embed), traj)
