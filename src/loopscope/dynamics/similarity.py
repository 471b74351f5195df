"""Similarity matrices over all (recurrence, layer) pairs of the block (Blayney et al. 2026 §3.3, §4 item 2:
attention Frobenius distances Figs. 2/21, residual cosine similarities Fig. 19).

Both return a square DataFrame whose index and columns are the MultiIndex (recurrence, layer) in realized order
(t-major: (0,0), (0,1), …, (0,K-1), (1,0), …), over the first `recurrences` recurrences (default all). Cost
grows as (r·K)² · tokens · D: the paper uses r = 8 (Fig. 2) and r = 32 (Figs. 19, 21).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._attention import gram, pairwise_distance, prompt_patterns, require_attention
from loopscope.dynamics._tokens import norm, real_tokens, token_chunks
from loopscope.errors import InputError


def _first(traj: Trajectory, recurrences: int | None) -> int:
    R = traj.recurrences
    if recurrences is None:
        return R
    if not 1 <= int(recurrences) <= R:
        raise InputError(f"recurrences={recurrences}: choose 1..{R} (this Trajectory has {R} recurrences)")
    return int(recurrences)


def _square(values: torch.Tensor, r: int, K: int) -> pd.DataFrame:
    index = pd.MultiIndex.from_product([range(r), range(K)], names=["recurrence", "layer"])
    return pd.DataFrame(values.numpy(), index=index, columns=index.copy())


def residual_similarity(traj: Trajectory, recurrences: int | None = None, *, finite_only: bool = False,
                        ) -> pd.DataFrame:
    """S[(t, j), (t', j')] = mean over real tokens of cos(X_{j,t}, X_{j',t'}) (Blayney et al. 2026 Fig. 19).

    Computed as (1/N) Σ_tokens U Uᵀ with U the unit-normalised states, in fp64. A token with a zero or
    non-finite state makes the affected entries NaN, unless `finite_only=True`, which drops tokens having any
    non-finite or zero state among the first `recurrences` recurrences.
    """
    r = _first(traj, recurrences)
    K = traj.block_size
    total = torch.zeros(r * K, r * K, dtype=torch.float64)
    count = 0
    for _, x in token_chunks(traj, real_tokens(traj), recurrences=slice(0, r)):
        u = x / norm(x)[..., None]  # [r, K, n, D]
        if finite_only:
            good = torch.isfinite(u).all(dim=-1).all(dim=0).all(dim=0)  # [n]
            u = u[:, :, good]
        count += u.shape[2]
        total += gram(u.reshape(r * K, -1))
    if count == 0:
        raise InputError("no token has finite, non-zero states in these recurrences; use finite_only=False")
    return _square(total / count, r, K)


def attention_distance(traj: Trajectory, recurrences: int | None = None, *, head_reduction: str = "stack",
                       ) -> pd.DataFrame:
    """D[(t, j), (t', j')] = mean over prompts of ‖A_{j,t} − A_{j',t'}‖_F (Blayney et al. 2026 §4 item 2, Fig. 2).

    A_{j,t} is the prompt's attention pattern of block layer j at recurrence t restricted to real query rows ×
    real key columns; the norm runs over heads × rows × columns (head_reduction="stack", default) or over the
    head-averaged pattern ("average"). Raises InputError when the Trajectory holds no attention.
    """
    require_attention(traj)
    r = _first(traj, recurrences)
    K = traj.block_size
    total = torch.zeros(r * K, r * K, dtype=torch.float64)
    prompts = 0
    for _, a in prompt_patterns(traj, slice(0, r), head_reduction):
        total += pairwise_distance(a.reshape(r * K, -1))
        prompts += 1
    if prompts == 0:
        raise InputError("no prompt has real tokens (mask is all False); check the mask")
    return _square(total / prompts, r, K)
