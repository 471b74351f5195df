"""Convergence of each block layer's state across recurrences (Blayney et al. 2026 §3.3, §4; Figs. 3, 4, 22–25).

Notation: X_{j,t} ∈ R^D is the output of block layer j at recurrence t for one real token (Trajectory.core),
t = 0..R-1. All norms are L2 over D; cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖) (NaN if either is zero/non-finite).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._attention import prompt_patterns
from loopscope.dynamics._tables import grid_frame
from loopscope.dynamics._tokens import cosine_from_distance, need_recurrences, norm, real_tokens, token_chunks


def successive_change(traj: Trajectory, per_token: bool = False, *, finite_only: bool = False) -> pd.DataFrame:
    """Change of each block layer's state between consecutive recurrences (Blayney et al. 2026 §3.3, Fig. 3;
    cosine version Fig. 24):

        l2       = ‖X_{j,t} − X_{j,t−1}‖
        relative = ‖X_{j,t} − X_{j,t−1}‖ / ‖X_{j,t−1}‖
        cosine   = cos(X_{j,t}, X_{j,t−1})                 for t = 1..R-1, every block layer j.

    Aggregated (default): one row per (recurrence, layer): [recurrence, layer, l2, l2_std, relative,
    relative_std, cosine, cosine_std, n_tokens], mean and population std over all real tokens of all prompts.
    Non-finite values propagate into the mean unless `finite_only=True`, which averages, per cell, the tokens
    whose three metrics are finite (n_tokens says how many).
    per_token=True: one row per (batch, token, recurrence, layer): [batch, token, recurrence, layer, l2,
    relative, cosine].
    """
    need_recurrences(traj, 2, "successive_change")
    tokens = real_tokens(traj)
    R, K, N = traj.recurrences, traj.block_size, tokens.count
    l2, rel, cos = (torch.empty(R - 1, K, N, dtype=torch.float64) for _ in range(3))
    for rows, x in token_chunks(traj, tokens):
        nx = norm(x)  # [R, K, n]
        d = norm(x[1:] - x[:-1])
        l2[..., rows], rel[..., rows] = d, d / nx[:-1]
        cos[..., rows] = cosine_from_distance(nx[1:], nx[:-1], d)
    metrics = {"l2": l2, "relative": rel, "cosine": cos}
    return grid_frame(tokens, torch.arange(1, R), metrics, per_token=per_token, finite_only=finite_only)


def distance_to_fixed_point(traj: Trajectory, per_token: bool = False, *, finite_only: bool = False,
                            head_reduction: str = "average") -> pd.DataFrame:
    """Distance of every state to its layer's approximate fixed point X*_j := X_{j,R-1}, the state at the last
    captured recurrence (the paper iterates 128 times; Blayney et al. 2026 §3.3, Fig. 4; cosine Fig. 22,
    attention Fig. 23):

        l2     = ‖X_{j,t} − X*_j‖           cosine = cos(X_{j,t}, X*_j)          for t = 0..R-1
        attention_frobenius = mean over prompts of ‖A_{j,t} − A_{j,R-1}‖_F over real query rows × real key
                              columns, where A is the prompt's head-averaged pattern (head_reduction="average",
                              default) or all heads stacked ("stack", as in `attention_distance`); NaN when the
                              Trajectory holds no attention.

    Aggregated: [recurrence, layer, l2, l2_std, cosine, cosine_std, n_tokens, attention_frobenius].
    per_token=True: [batch, token, recurrence, layer, l2, cosine, attention_frobenius] — there the attention
    column holds the value of the token's own prompt. `finite_only` as in `successive_change`.
    """
    tokens = real_tokens(traj)
    R, K, N = traj.recurrences, traj.block_size, tokens.count
    l2, cos = (torch.empty(R, K, N, dtype=torch.float64) for _ in range(2))
    for rows, x in token_chunks(traj, tokens):
        nx, d = norm(x), norm(x - x[-1:])
        l2[..., rows], cos[..., rows] = d, cosine_from_distance(nx, nx[-1:], d)
    frame = grid_frame(tokens, torch.arange(R), {"l2": l2, "cosine": cos}, per_token=per_token,
                       finite_only=finite_only)
    per_prompt = attention_to_last(traj, head_reduction)  # [R, K, B] or None
    if per_prompt is None:
        frame["attention_frobenius"] = float("nan")
    elif per_token:
        frame["attention_frobenius"] = per_prompt[frame["recurrence"].to_numpy(), frame["layer"].to_numpy(),
                                                  frame["batch"].to_numpy()].numpy()
    else:
        mean = per_prompt.nanmean(dim=-1) if finite_only else per_prompt[..., prompts_with_tokens(traj)].mean(-1)
        frame["attention_frobenius"] = mean.reshape(-1).numpy()
    return frame


def prompts_with_tokens(traj: Trajectory) -> torch.Tensor:
    return traj.mask.cpu().any(dim=1).nonzero(as_tuple=True)[0]


def attention_to_last(traj: Trajectory, head_reduction: str) -> torch.Tensor | None:
    """[R, K, B] Frobenius distance of each prompt's pattern to its last-recurrence pattern (NaN for prompts
    without real tokens); None when no attention was captured."""
    if traj.core_attention is None:
        return None
    out = torch.full((traj.recurrences, traj.block_size, traj.batch_size), float("nan"), dtype=torch.float64)
    for b, a in prompt_patterns(traj, slice(None), head_reduction):
        out[..., b] = norm(a - a[-1:])
    return out


def cyclic_fixed_point_check(traj: Trajectory) -> pd.DataFrame:
    """Numerical check of Proposition 4.1 (Blayney et al. 2026 §3.2): once the block's last layer has reached
    its fixed point, every cyclic permutation of the block has one, so every layer's change between the last
    two recurrences must be small too. One row per block layer j:

        final_change          = mean over real tokens of ‖X_{j,R-1} − X_{j,R-2}‖
        final_relative_change = mean over real tokens of ‖X_{j,R-1} − X_{j,R-2}‖ / ‖X_{j,R-2}‖
        max_relative_change   = max over real tokens of the same ratio

    Columns [layer, final_change, final_relative_change, max_relative_change]; non-finite states give
    non-finite (inf/NaN) entries.
    """
    need_recurrences(traj, 2, "cyclic_fixed_point_check")
    tokens = real_tokens(traj)
    K, N = traj.block_size, tokens.count
    change, rel = (torch.empty(K, N, dtype=torch.float64) for _ in range(2))
    for rows, x in token_chunks(traj, tokens, recurrences=slice(-2, None)):
        d = norm(x[1] - x[0])
        change[:, rows], rel[:, rows] = d, d / norm(x[0])
    return pd.DataFrame({
        "layer": range(K),
        "final_change": change.mean(-1).numpy(),
        "final_relative_change": rel.mean(-1).numpy(),
        "max_relative_change": max_with_nan(rel).numpy(),
    })


def max_with_nan(x: torch.Tensor) -> torch.Tensor:
    """Max over the last axis that returns NaN when any entry is NaN (torch.amax already does; explicit here)."""
    return torch.where(x.isnan().any(-1), torch.tensor(float("nan"), dtype=x.dtype), x.amax(-1))


def max_final_relative_change(traj: Trajectory) -> float:
    """The largest per-layer `final_relative_change` of `cyclic_fixed_point_check` (Prop. 4.1: small for every
    layer as soon as it is small for the last layer)."""
    values = torch.tensor(cyclic_fixed_point_check(traj)["final_relative_change"].to_numpy())
    return float(max_with_nan(values))
