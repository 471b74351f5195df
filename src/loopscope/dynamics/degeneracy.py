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

from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._tokens import cosine, need_recurrences, norm, real_tokens, token_chunks

DISTINCT, DEGENERATE, NO_FIXED_POINT = "distinct cyclic fixed point", "degenerate fixed point", "no fixed point"
VERDICTS = (DISTINCT, DEGENERATE, NO_FIXED_POINT)
CONVERGE_TOL = 1e-3


def degeneracy(traj: Trajectory, tol: float = 0.99, converge_tol: float = CONVERGE_TOL) -> pd.DataFrame:
    """One row per real (batch, token): [batch, token, min_cosine_to_first, converged, verdict] (see module doc
    for formulas and thresholds)."""
    need_recurrences(traj, 2, "degeneracy")
    tokens = real_tokens(traj)
    K, N = traj.block_size, tokens.count
    min_cos = torch.empty(N, dtype=torch.float64)
    converged = torch.empty(N, dtype=torch.bool)
    for rows, x in token_chunks(traj, tokens, recurrences=slice(-2, None)):
        star = x[1]  # [K, n, D]
        if K == 1:
            min_cos[rows] = 1.0
        else:
            c = cosine(star[:1], star[1:])  # [K-1, n]
            min_cos[rows] = c.amin(0).double()  # amin propagates NaN
        last_prev, last = x[0, -1], x[1, -1]
        rel = norm(last - last_prev) / norm(last_prev)
        finite = torch.isfinite(x).all(-1).all(0).all(0)
        converged[rows] = (rel < converge_tol) & finite
    same = min_cos >= tol
    verdict = [NO_FIXED_POINT if not c else (DEGENERATE if s else DISTINCT)
               for c, s in zip(converged.tolist(), same.tolist())]
    return pd.DataFrame({
        "batch": tokens.batch.numpy(), "token": tokens.token.numpy(),
        "min_cosine_to_first": min_cos.numpy(), "converged": converged.numpy(), "verdict": verdict,
    })


def degeneracy_summary(traj: Trajectory, tol: float = 0.99, converge_tol: float = CONVERGE_TOL) -> pd.DataFrame:
    """One row summarising `degeneracy` over all real tokens:

    [min_cosine_to_first_mean, min_cosine_to_first_min (NaN-skipping, over tokens), fraction_distinct_cyclic,
    fraction_degenerate, fraction_no_fixed_point (fractions of tokens, summing to 1), verdict (the most
    frequent per-token verdict; ties go to the first of "no fixed point", "degenerate fixed point",
    "distinct cyclic fixed point", the most conservative first), n_tokens].
    """
    per = degeneracy(traj, tol=tol, converge_tol=converge_tol)
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
        "n_tokens": len(per),
    }])
