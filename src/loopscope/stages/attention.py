"""Attention stages metrics, per head, on each prompt's real tokens.

For every captured attention matrix A (row-stochastic, causal), each prompt's matrix is first restricted
to its own real tokens (rows and columns, `traj.mask`), so T below is that prompt's length T_b:

- ColSum concentration (Queipo-de-Llano et al. 2025, as used by Blayney et al. 2026 §3.5):
  c_j = Σ_i A_ij, ĉ_j = c_j / T (Σ_j ĉ_j = 1), C = 1 + (1/log T) Σ_j ĉ_j log ĉ_j ∈ [0, 1]
  (0 log 0 = 0; C is undefined, NaN, for T = 1). C = 1: all mass on one column; C = 0: flat column sums.
- Sink score and sink rate (Gu et al. 2024, "When attention sink emerges"; Blayney et al. §3.5):
  score_k = (1/T) Σ_t A_{t,k} for the sink position k (index among the real tokens; default 0 = first
  token / BOS); a head is a sink when score_k ≥ τ (τ = 0.3). Per (prompt, head) the column `sink_rate`
  holds that 0/1 indicator, so its mean over heads is Gu et al.'s sink rate (fraction of heads that sink).
- Mixing score (Queipo-de-Llano et al. 2025; Blayney et al. §3.5): mean row entropy in nats,
  mixing = (1/T) Σ_i H(A_i,:), H(p) = −Σ_j p_j log p_j (every row, including row 0 whose entropy is 0).
  `mixing_entropy_normalised` divides each row's entropy by the log of its support, log(i + 1) for causal
  row i (the number of keys it may see), and averages over the rows i ≥ 1 that have a choice; 1 = uniform
  over the visible prefix, 0 = one-hot. NaN for T = 1.
- Previous-token window (Lad et al. 2024, `attention_prev5` notebook: attention on the previous 5 tokens,
  BOS excluded, a detokenisation signature): for query row i, m_i = Σ_{k=1..w} A_{i, i−k} over keys
  i − k ≥ 1 (the first real token is excluded, w = 5 by default); the score is the mean of m_i over the
  rows that have at least one such key (i ≥ 2). It is the fraction of a row's mass on its w preceding
  non-BOS tokens: 1 = purely local, 0 = none.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from loopscope.accumulate.core import Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows, xlogx

ATTENTION_METRICS = [
    "colsum_concentration", "sink_score", "sink_rate", "mixing_entropy", "mixing_entropy_normalised",
    "previous_window",
]


def colsum_concentration(a: torch.Tensor) -> torch.Tensor:
    """C = 1 + (1/log T) Σ_j ĉ_j log ĉ_j with ĉ_j = (Σ_i A_ij)/T. a: (..., T, T) → (...); NaN when T = 1."""
    T = a.shape[-1]
    if T < 2:
        return torch.full(a.shape[:-2], float("nan"), dtype=a.dtype, device=a.device)
    c_hat = a.sum(-2) / T
    return 1 + xlogx(c_hat).sum(-1) / math.log(T)


def sink_score(a: torch.Tensor, position: int = 0) -> torch.Tensor:
    """(1/T) Σ_t A_{t,k} for k = `position`. a: (..., T, T) → (...); NaN when the prompt is shorter than k+1."""
    if position >= a.shape[-1]:
        return torch.full(a.shape[:-2], float("nan"), dtype=a.dtype, device=a.device)
    return a[..., :, position].mean(-1)


def row_entropy(a: torch.Tensor) -> torch.Tensor:
    """H(A_i,:) = −Σ_j A_ij log A_ij in nats. a: (..., T, T) → (..., T)."""
    return -xlogx(a).sum(-1)


def mixing_entropy(a: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """Mean row entropy (1/T) Σ_i H(A_i,:) in nats. a: (..., T, T) → (...); `h`: `row_entropy(a)` if known."""
    return (row_entropy(a) if h is None else h).mean(-1)


def mixing_entropy_normalised(a: torch.Tensor, causal: bool = True, h: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows with support > 1 of H(A_i,:) / log(support_i); support_i = i + 1 (causal) or T.

    a: (..., T, T) → (...); NaN for T = 1. `h`: `row_entropy(a)` if already computed.
    """
    T = a.shape[-1]
    if T < 2:
        return torch.full(a.shape[:-2], float("nan"), dtype=a.dtype, device=a.device)
    h = row_entropy(a) if h is None else h
    if causal:  # rows i ≥ 1, support i + 1
        h, support = h[..., 1:], torch.arange(2, T + 1, dtype=a.dtype, device=a.device)
    else:
        support = torch.full((T,), float(T), dtype=a.dtype, device=a.device)
    return (h / torch.log(support)).mean(-1)


def previous_window(a: torch.Tensor, window: int = 5, exclude_first: bool = True) -> torch.Tensor:
    """Mean over query rows of Σ_{k=1..window} A_{i,i−k}, keys i−k ≥ 1 when `exclude_first` (BOS) else ≥ 0.

    Rows without any eligible key are skipped. a: (..., T, T) → (...); NaN when no row qualifies.
    """
    T = a.shape[-1]
    first = 1 if exclude_first else 0
    if window < 1 or T < first + 2:  # row i has a key iff i − 1 ≥ first: the rows first + 1 .. T − 1
        return torch.full(a.shape[:-2], float("nan"), dtype=a.dtype, device=a.device)
    i = torch.arange(T, device=a.device)[:, None]
    j = torch.arange(T, device=a.device)[None, :]
    band = (j < i) & (j >= i - window) & (j >= first)
    mass = (a * band.to(a.dtype)).sum(-1)
    return mass[..., first + 1:].mean(-1)


def head_metrics(a: torch.Tensor, *, sink_position: int = 0, sink_threshold: float = 0.3,
                 window: int = 5) -> dict[str, torch.Tensor]:
    """Every metric of this module for a stack of heads a: (H, T, T) of one prompt's real tokens → (H,) each."""
    score = sink_score(a, sink_position)
    h = row_entropy(a)  # once, for both mixing scores
    return {
        "colsum_concentration": colsum_concentration(a),
        "sink_score": score,
        "sink_rate": torch.where(torch.isnan(score), score, (score >= sink_threshold).to(a.dtype)),
        "mixing_entropy": mixing_entropy(a, h),
        "mixing_entropy_normalised": mixing_entropy_normalised(a, h=h),
        "previous_window": previous_window(a, window),
    }


class AttentionMetrics(PromptRows):
    """`head_metrics` of every attention pattern, prompt and head, as each pattern is produced (on its device, in
    float64; the batch's values reach the host once, in `end`)."""

    name = "attention_metrics"
    values = ATTENTION_METRICS
    sites = frozenset({"pattern"})
    needs_attention = True

    def __init__(self, over: list[str], raw: bool = False, *, sink_position: int = 0, sink_threshold: float = 0.3,
                 window: int = 5) -> None:
        super().__init__(over, raw)
        self.settings = dict(sink_position=sink_position, sink_threshold=sink_threshold, window=window)

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        ids = self.ids(step)
        for b, pos in enumerate(self.positions):
            a = self.ctx.prompt_pattern(x, b).to(dtype=torch.float64)  # (H, T_b, T_b)
            metrics = head_metrics(a, **self.settings)
            self.record([{**ids, "batch": self.ctx.first_prompt + b, "head": h, "n_tokens": len(pos)}
                         for h in range(a.shape[0])], torch.stack([metrics[m] for m in self.values], dim=1))

    def end(self) -> Part:
        if not self.rows:
            raise InputError("this Trajectory has no attention; capture it with attention=True")
        return super().end()


def attention_metrics(
    traj: Trajectory,
    *,
    sink_position: int = 0,
    sink_threshold: float = 0.3,
    window: int = 5,
    per_head: bool = False,
    per_prompt: bool = False,
) -> pd.DataFrame:
    """Attention stages metrics for every captured layer (prelude, each recurrence's block, coda).

    Returns columns STATE_COLUMNS (+ `head` if per_head, + `batch` if per_prompt) and, for each metric m in
    ATTENTION_METRICS, `m_mean`, `m_std` (sample std over the pooled observations, so the spread across
    heads and prompts) and `n` (observations pooled into the row: prompts × heads, prompts, or heads).
    With per_head=True and per_prompt=True the raw observations are returned instead: one row per
    (state, batch, head) with `n_tokens` and the metric columns themselves. See the module docstring for
    the formulas and sources; `sink_rate_mean` is the fraction of (prompt, head) pairs whose sink score is
    ≥ `sink_threshold`, i.e. Gu et al.'s sink rate averaged over prompts.
    """
    if traj.core_attention is None:
        raise InputError("this Trajectory has no attention; capture it with attention=True")
    over = [c for c, keep in (("batch", per_prompt), ("head", per_head)) if not keep]
    acc = AttentionMetrics(over, raw=per_head and per_prompt, sink_position=sink_position,
                           sink_threshold=sink_threshold, window=window)
    return run_on_trajectory(acc, traj)
