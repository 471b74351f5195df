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

from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows


def head_frobenius_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """‖current_h − previous_h‖_F per head. (H, T, T) × 2 → (H,)."""
    return (current.double() - previous.double()).flatten(-2).norm(dim=-1)


class AttentionChange(PromptRows):
    """‖A_{j,t} − A_{j,t−1}‖_F per block layer, recurrence t ≥ 1, prompt (and head), as each pattern is produced, on
    its device: only the previous recurrence's pattern of each layer is kept."""

    name = "attention_change"
    values = ["attention_change"]
    sites = frozenset({"pattern"})
    needs_attention = True

    def __init__(self, over: list[str], raw: bool = False, per_head: bool = False) -> None:
        super().__init__(over, raw)
        self.per_head = per_head

    def begin(self, ctx) -> None:
        super().begin(ctx)
        if ctx.recurrences < 2:
            raise InputError("attention change across recurrences needs at least 2 recurrences; capture with more")
        self.previous: dict[int, list[torch.Tensor]] = {}

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core":
            return
        current = []
        for b in range(len(self.positions)):
            current.append(self.ctx.prompt_pattern(x, b))
        prev = self.previous.get(step.layer)
        if prev is not None:
            ids = self.ids(step)
            for b, (cur, old) in enumerate(zip(current, prev)):
                per_h = head_frobenius_change(cur, old)  # (H,) float64 on the patterns' device
                prompt = self.ctx.first_prompt + b
                if self.per_head:
                    self.record([{**ids, "batch": prompt, "head": h} for h in range(per_h.shape[0])], per_h)
                else:
                    self.record([{**ids, "batch": prompt}], per_h.pow(2).sum().sqrt())
        self.previous[step.layer] = current

    def end(self):
        if not self.rows and self.ctx.recurrences >= 2:
            raise InputError("this Trajectory has no attention; capture it with attention=True")
        return super().end()


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
    return run_on_trajectory(AttentionChange(["batch"], raw=per_prompt, per_head=per_head), traj)
