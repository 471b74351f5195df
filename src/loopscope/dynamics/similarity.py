"""Similarity matrices over all (recurrence, layer) pairs of the block (Blayney et al. 2026 §3.3, §4 item 2:
attention Frobenius distances Figs. 2/21, residual cosine similarities Fig. 19).

Both return a square DataFrame whose index and columns are the MultiIndex (recurrence, layer) in realized order
(t-major: (0,0), (0,1), …, (0,K-1), (1,0), …), over the first `recurrences` recurrences (default all). Cost
grows as (r·K)² · tokens · D: the paper uses r = 8 (Fig. 2) and r = 32 (Figs. 19, 21). Streaming keeps the
states (or patterns) of the first r recurrences of one batch only — what the figure draws — and reduces each
batch to a sum of r·K × r·K products.
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._attention import check_head_reduction, gram, pairwise_distance, require_attention
from loopscope.dynamics._tokens import batch_tokens, compute_dtype, norm
from loopscope.errors import InputError
from loopscope.labels import Step


def first_recurrences(total: int, recurrences: int | None) -> int:
    if recurrences is None:
        return total
    if not 1 <= int(recurrences) <= total:
        raise InputError(f"recurrences={recurrences}: choose 1..{total} (this Trajectory has {total} recurrences)")
    return int(recurrences)


def square(values: torch.Tensor, r: int, K: int) -> pd.DataFrame:
    index = pd.MultiIndex.from_product([range(r), range(K)], names=["recurrence", "layer"])
    return pd.DataFrame(values.numpy(), index=index, columns=index.copy())


class ResidualSimilarity(Accumulator):
    """S[(t, j), (t', j')] = mean over real tokens of cos(X_{j,t}, X_{j',t'}) for t, t' < r (see
    `residual_similarity`)."""

    name = "residual_similarity"
    sites = frozenset({"resid_post"})

    def __init__(self, recurrences: int | None = None, finite_only: bool = False) -> None:
        self.requested, self.finite_only = recurrences, finite_only

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self.r = first_recurrences(ctx.recurrences, self.requested)
        self.b, self.t = ctx.real_on(ctx.device)
        self.units: dict[tuple[int, int], torch.Tensor] = {}  # kept on the states' device until `end`

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment == "core" and step.recurrence < self.r:
            u = batch_tokens(x, self.b, self.t)
            self.units[(step.recurrence, step.layer)] = u / norm(u)[:, None]

    def end(self) -> Part:
        K = self.ctx.block_size
        u = torch.stack([self.units[(t, j)] for t in range(self.r) for j in range(K)])  # [rK, n, D]
        if self.finite_only:
            u = u[:, torch.isfinite(u).all(-1).all(0)]
        self.units = {}
        return {"total": gram(u.reshape(u.shape[0], -1)), "count": int(u.shape[1]), "r": self.r, "K": K}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        count = sum(p["count"] for p in parts)
        if count == 0:
            raise InputError("no token has finite, non-zero states in these recurrences; use finite_only=False")
        total = parts[0]["total"].clone()
        for p in parts[1:]:
            total += p["total"]
        return square(total / count, parts[0]["r"], parts[0]["K"])


class AttentionDistance(Accumulator):
    """D[(t, j), (t', j')] = mean over prompts of ‖A_{j,t} − A_{j',t'}‖_F for t, t' < r (see `attention_distance`)."""

    name = "attention_distance"
    sites = frozenset({"pattern"})
    needs_attention = True

    def __init__(self, recurrences: int | None = None, head_reduction: str = "stack") -> None:
        check_head_reduction(head_reduction)
        self.requested, self.head_reduction = recurrences, head_reduction

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self.r = first_recurrences(ctx.recurrences, self.requested)
        self.positions = [m.nonzero(as_tuple=True)[0] for m in ctx.mask]
        self.patterns: dict[tuple[int, int], list[torch.Tensor | None]] = {}

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core" or step.recurrence >= self.r:
            return
        rows = []
        for b, pos in enumerate(self.positions):
            if pos.numel() == 0:
                rows.append(None)
                continue
            a = self.ctx.prompt_pattern(x, b)  # kept on the states' device until `end`
            # probabilities are float32 (or float64 when given so): kept as they are, summed in float64 in the Gram
            a = a.double().mean(0) if self.head_reduction == "average" else a.to(compute_dtype(a))
            rows.append(a.reshape(-1))
        self.patterns[(step.recurrence, step.layer)] = rows

    def end(self) -> Part:
        K = self.ctx.block_size
        if len(self.patterns) < self.r * K:
            raise InputError("this Trajectory has no attention; capture with attention=True")
        total = torch.zeros(self.r * K, self.r * K, dtype=torch.float64, device=self.ctx.device)
        prompts = 0
        for b, pos in enumerate(self.positions):
            if pos.numel() == 0:
                continue
            a = torch.stack([self.patterns[(t, j)][b] for t in range(self.r) for j in range(K)])
            total += pairwise_distance(a)
            prompts += 1
        self.patterns = {}
        return {"total": total, "prompts": prompts, "r": self.r, "K": K}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        prompts = sum(p["prompts"] for p in parts)
        if prompts == 0:
            raise InputError("no prompt has real tokens (mask is all False); check the mask")
        total = parts[0]["total"].clone()
        for p in parts[1:]:
            total += p["total"]
        return square(total / prompts, parts[0]["r"], parts[0]["K"])


def residual_similarity(traj: Trajectory, recurrences: int | None = None, *, finite_only: bool = False,
                        ) -> pd.DataFrame:
    """S[(t, j), (t', j')] = mean over real tokens of cos(X_{j,t}, X_{j',t'}) (Blayney et al. 2026 Fig. 19).

    Computed as (1/N) Σ_tokens U Uᵀ with U the unit-normalised states, in fp64. A token with a zero or
    non-finite state makes the affected entries NaN, unless `finite_only=True`, which drops tokens having any
    non-finite or zero state among the first `recurrences` recurrences.
    """
    first_recurrences(traj.recurrences, recurrences)
    return run_on_trajectory(ResidualSimilarity(recurrences, finite_only), traj)


def attention_distance(traj: Trajectory, recurrences: int | None = None, *, head_reduction: str = "stack",
                       ) -> pd.DataFrame:
    """D[(t, j), (t', j')] = mean over prompts of ‖A_{j,t} − A_{j',t'}‖_F (Blayney et al. 2026 §4 item 2, Fig. 2).

    A_{j,t} is the prompt's attention pattern of block layer j at recurrence t restricted to real query rows ×
    real key columns; the norm runs over heads × rows × columns (head_reduction="stack", default) or over the
    head-averaged pattern ("average"). Raises InputError when the Trajectory holds no attention.
    """
    require_attention(traj)
    first_recurrences(traj.recurrences, recurrences)
    return run_on_trajectory(AttentionDistance(recurrences, head_reduction), traj)
