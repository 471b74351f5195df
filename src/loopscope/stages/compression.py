"""Residual-stream compression: matrix-based entropy of the token-representation matrix.

Skean et al. 2025 ("Layer by Layer: Uncovering Hidden Representations") and Queipo-de-Llano et al. 2025
("compression valley"), as used by Blayney et al. 2026 §3.5. For one prompt's state X ∈ R^{T×D} (real
tokens only, uncentred):

    λ = eigenvalues of XXᵀ / tr(XXᵀ)   (= σ_i² / Σ σ², σ the singular values of X; Σ λ = 1)
    H(X) = −Σ_i λ_i log λ_i            (nats; the α → 1 Rényi / von Neumann entropy)
    H_norm = H / log T                 ∈ [0, 1]

H_norm = 0 for a rank-1 matrix (all tokens on one line: maximal compression) and 1 when the T rows are
orthogonal with equal norms (no compression). NaN for T = 1 or an all-zero state. The paper averages over
sequences; we keep the spread (std over prompts). NaN too for a state with a non-finite entry.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows, xlogx

COMPRESSION_METRICS = ["matrix_entropy", "matrix_entropy_normalised"]


def matrix_entropy(x: torch.Tensor) -> tuple[float, float]:
    """(H, H / log T) of x: (T, D) from its trace-normalised Gram spectrum; NaN where undefined."""
    x = x.double()
    T = x.shape[0]
    if not bool(torch.isfinite(x).all()):
        return float("nan"), float("nan")  # a non-finite state (a diverged loop) has no spectrum
    gram = x.T @ x if T > x.shape[1] else x @ x.T  # its eigenvalues are σ_i² of X; the smaller side is cheaper
    s2 = torch.linalg.eigvalsh(gram).clamp_min(0).cpu()
    total = float(s2.sum())
    if total <= 0:
        return float("nan"), float("nan")
    h = float(-xlogx(s2 / total).sum())
    h = max(h, 0.0)  # round-off can give −1e-16 for rank 1
    return h, (h / math.log(T) if T > 1 else float("nan"))


class ResidualEntropy(PromptRows):
    """`matrix_entropy` of every state and prompt, as each state is produced."""

    name = "residual_entropy"
    values = COMPRESSION_METRICS
    sites = frozenset({"resid_post", "embed"})

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if not self.wants(site, step):
            return
        ids = self.ids(step)
        for b, prompt, pos, xb in self.prompts(x):
            h, h_norm = matrix_entropy(xb)
            self.rows.append({**ids, "batch": prompt, "n_tokens": len(pos), "matrix_entropy": h,
                              "matrix_entropy_normalised": h_norm})


def residual_entropy(traj: Trajectory, *, per_prompt: bool = False, include_embed: bool = False) -> pd.DataFrame:
    """Matrix-based entropy of every state. Columns: STATE_COLUMNS, `matrix_entropy_mean/_std`,
    `matrix_entropy_normalised_mean/_std`, `n` (prompts); per_prompt=True gives one raw row per
    (state, batch) with `n_tokens`."""
    return run_on_trajectory(ResidualEntropy(["batch"], raw=per_prompt, include_embed=include_embed), traj)
