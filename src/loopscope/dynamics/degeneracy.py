"""Distinct vs degenerate cyclic fixed points (Blayney et al. 2026 §3.2 Prop. 4.1, §3.3 "degeneracy test",
Fig. 6 right frame).

Per real token, X*_j := X_{j,R-1} is block layer j's state at the last recurrence (its approximate fixed point).

    min_cosine_to_first = min_{j ≥ 1} cos(X*_0, X*_j)    (→ 1 when every layer shares one point; with a
                                                           one-layer block there is no other layer: 1.0)
    converged           = ‖X_{K-1,R-1} − X_{K-1,R-2}‖ / ‖X_{K-1,R-2}‖ < converge_tol  (last block layer;
                          by Prop. 4.1 the other layers follow). Non-finite states never count as converged.

Verdict per token:
    "no fixed point"               if not converged;
    "degenerate fixed point"       if converged and min_cosine_to_first ≥ tol;
    "distinct cyclic fixed point"  if converged and min_cosine_to_first < tol.

Thresholds (defaults): tol = 0.99 (cosine at which two layers' fixed points count as the same point);
converge_tol = 1e-3 (relative last-step change of the last layer; the same bound used to read Prop. 4.1
in `cyclic_fixed_point_check`).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._tokens import batch_tokens, cosine, need_recurrences, norm

DISTINCT, DEGENERATE, NO_FIXED_POINT = "distinct cyclic fixed point", "degenerate fixed point", "no fixed point"
VERDICTS = (DISTINCT, DEGENERATE, NO_FIXED_POINT)
CONVERGE_TOL = 1e-3
SAME_POINT_COSINE = 0.99  # cosine at which two layers' fixed points count as one point (one place for it)


class Degeneracy(Accumulator):
    """Per real token: min cosine between layer 0's fixed point and the others', converged, verdict (read off the
    batch's finals: the last two recurrences)."""

    name = "degeneracy"
    sites = frozenset()
    needs_finals = True

    def __init__(self, tol: float = SAME_POINT_COSINE, converge_tol: float = CONVERGE_TOL) -> None:
        self.tol, self.converge_tol = tol, converge_tol

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        b, t = ctx.real
        K = ctx.block_size
        star = torch.stack([batch_tokens(ctx.finals.core_last[j], b, t) for j in range(K)])  # [K, n, D]
        if K == 1:
            min_cos = torch.ones(b.numel(), dtype=torch.float64)
        else:
            min_cos = cosine(star[:1], star[1:]).amin(0).double().cpu()  # amin propagates NaN
        prev = batch_tokens(ctx.finals.core_prev[-1], b, t)
        rel = (norm(star[-1] - prev) / norm(prev)).cpu()
        finite = (torch.isfinite(star).all(-1).all(0) & torch.isfinite(prev).all(-1)).cpu()
        converged = (rel < self.converge_tol) & finite
        same = min_cos >= self.tol
        verdict = [NO_FIXED_POINT if not c else (DEGENERATE if s_ else DISTINCT)
                   for c, s_ in zip(converged.tolist(), same.tolist())]
        self.frame = pd.DataFrame({
            "batch": (b + ctx.first_prompt).numpy(), "token": t.numpy(),
            "min_cosine_to_first": min_cos.numpy(), "converged": converged.numpy(), "verdict": verdict,
        })

    def end(self) -> Part:
        return {"frame": self.frame}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        return pd.concat([p["frame"] for p in parts], ignore_index=True)


def degeneracy(traj: Trajectory, tol: float = SAME_POINT_COSINE, converge_tol: float = CONVERGE_TOL) -> pd.DataFrame:
    """One row per real (batch, token): [batch, token, min_cosine_to_first, converged, verdict] (see module doc
    for formulas and thresholds)."""
    need_recurrences(traj, 2, "degeneracy")
    return run_on_trajectory(Degeneracy(tol, converge_tol), traj)


def degeneracy_summary(traj: Trajectory | pd.DataFrame, tol: float = SAME_POINT_COSINE,
                       converge_tol: float = CONVERGE_TOL) -> pd.DataFrame:
    """One row summarising `degeneracy` over all real tokens (pass a Trajectory, or the `degeneracy` table):

    [min_cosine_to_first_mean, min_cosine_to_first_min (NaN-skipping, over tokens), fraction_distinct_cyclic,
    fraction_degenerate, fraction_no_fixed_point (fractions of tokens, summing to 1), verdict (the most
    frequent per-token verdict; ties go to the first of "no fixed point", "degenerate fixed point",
    "distinct cyclic fixed point", the most conservative first), n (tokens)].
    """
    per = traj if isinstance(traj, pd.DataFrame) else degeneracy(traj, tol=tol, converge_tol=converge_tol)
    frac = per["verdict"].value_counts(normalize=True)
    order = (NO_FIXED_POINT, DEGENERATE, DISTINCT)
    majority = max(order, key=lambda v: (frac.get(v, 0.0), -order.index(v)))
    return pd.DataFrame([{
        "min_cosine_to_first_mean": per["min_cosine_to_first"].mean(),
        "min_cosine_to_first_min": per["min_cosine_to_first"].min(),
        "fraction_distinct_cyclic": float(frac.get(DISTINCT, 0.0)),
        "fraction_degenerate": float(frac.get(DEGENERATE, 0.0)),
        "fraction_no_fixed_point": float(frac.get(NO_FIXED_POINT, 0.0)),
        "verdict": majority,
        "n": len(per),  # tokens (the table dialect's count column, `loopscope.tables`)
    }])
