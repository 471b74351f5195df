"""How much each block layer's attention moves between consecutive recurrences.

Blayney et al. (2026) §3.3 / Fig. 25 and §4: the Frobenius norm of the difference between the attention
matrices of the same block layer j at recurrences t and t−1,

    Δ_{j,t} = ‖A_{j,t} − A_{j,t−1}‖_F,   t ≥ 1,

computed on each prompt's real tokens (rows and columns). Per head, or for the whole head stack
(‖·‖_F over heads × T_b × T_b, i.e. sqrt of the sum of the per-head squares). Proposition 4.2 bounds this
quantity per head (see `loopscope.stages.prop42`).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.stages.frames import real_positions, summarise


def head_frobenius_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """‖current_h − previous_h‖_F per head. (H, T, T) × 2 → (H,)."""
    return (current.double() - previous.double()).flatten(-2).norm(dim=-1)


def attention_change(traj: Trajectory, *, per_head: bool = False, per_prompt: bool = False) -> pd.DataFrame:
    """‖A_{j,t} − A_{j,t−1}‖_F for every block layer j and recurrence t ≥ 1 (identifying columns of (core, t, j)).

    Columns: STATE_COLUMNS (+ `head` if per_head) and `attention_change_mean`, `attention_change_std`,
    `n` (prompts). Without per_head one observation per prompt is the norm over the whole head stack. With
    per_prompt=True the raw `attention_change` per (state, batch[, head]) is returned instead.
    """
    if traj.core_attention is None:
        raise InputError("this Trajectory has no attention; capture it with attention=True")
    if traj.recurrences < 2:
        raise InputError("attention change across recurrences needs at least 2 recurrences; capture with more")
    index = traj.realized_index()
    core = index[index.segment == "core"].set_index(["recurrence", "layer"])
    positions = real_positions(traj)
    rows = []
    for t in range(1, traj.recurrences):
        for j in range(traj.block_size):
            ids = {"segment": "core", "recurrence": t, "layer": j,
                   "depth": int(core.loc[(t, j), "depth"]), "relative_depth": float(core.loc[(t, j), "relative_depth"])}
            for b, pos in enumerate(positions):
                cur = traj.core_attention[t, j, b].cpu().index_select(-2, pos).index_select(-1, pos)
                prev = traj.core_attention[t - 1, j, b].cpu().index_select(-2, pos).index_select(-1, pos)
                per_h = head_frobenius_change(cur, prev)
                if per_head:
                    rows += [{**ids, "batch": b, "head": h, "attention_change": float(v)} for h, v in enumerate(per_h)]
                else:
                    rows.append({**ids, "batch": b, "attention_change": float(per_h.pow(2).sum().sqrt())})
    raw = pd.DataFrame(rows)
    if per_prompt:
        return raw
    return summarise(raw, ["attention_change"], over=["batch"])
