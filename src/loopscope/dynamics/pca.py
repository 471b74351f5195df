"""PCA of one token's latent trajectory across (recurrence, layer) (Geiping et al. 2025 Fig. 12; Blayney et al.
2026 §4 item 4, Fig. 5: a closed cycle traced by the final token's states over layers and recurrences)."""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step


def token_position(mask: torch.Tensor, batch: int, token: int) -> int:
    """Position of `token` in prompt `batch` (negative values index the real tokens: -1 = the last real one)."""
    if not 0 <= batch < mask.shape[0]:
        raise InputError(f"batch={batch} is out of range for {mask.shape[0]} prompts")
    real = mask[batch].cpu().nonzero(as_tuple=True)[0]
    if real.numel() == 0:
        raise InputError(f"prompt {batch} has no real tokens (its mask is all False)")
    if token < 0:
        if -token > real.numel():
            raise InputError(f"token={token}: prompt {batch} has only {real.numel()} real tokens")
        return int(real[token])
    if token >= mask.shape[1] or not bool(mask[batch, token]):
        raise InputError(f"token={token} of prompt {batch} is padding or out of range; real positions are "
                         f"{real.tolist()[:5]}…{int(real[-1])} (negative values count from the last real token)")
    return token


class TokenStates(Accumulator):
    """Keeps every block state X_{j,t} of one chosen token (prompt `batch`, position `token`), and nothing else:
    what the PCA figure needs (R·K vectors of one token)."""

    name = "pca_trajectory"
    sites = frozenset({"resid_post"})

    def __init__(self, batch: int = 0, token: int = -1, n_components: int = 6) -> None:
        if n_components < 1:
            raise InputError(f"n_components={n_components}: ask for at least 1")
        self.batch, self.token, self.n_components = batch, token, n_components

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        local = self.batch - ctx.first_prompt
        self.local = local if 0 <= local < ctx.batch_size else None
        self.position = None if self.local is None else token_position(ctx.mask, self.local, self.token)
        self.states: torch.Tensor | None = None  # [R·K, D], filled in realized order: one allocation

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if self.local is not None and step.segment == "core":
            if self.states is None:
                self.states = torch.full((self.ctx.recurrences * self.ctx.block_size, x.shape[-1]), float("nan"),
                                         dtype=torch.float64)
            self.states[step.recurrence * self.ctx.block_size + step.layer] = x[self.local, self.position]

    def end(self) -> Part:
        if self.local is None:
            return {"found": False}
        R, K = self.ctx.recurrences, self.ctx.block_size
        return {"found": True, "states": self.states, "R": R, "K": K, "P": self.ctx.n_prelude}

    def combine(self, parts: list[Part]) -> tuple[pd.DataFrame, pd.DataFrame]:
        found = [p for p in parts if p["found"]]
        if not found:
            raise InputError(f"prompt {self.batch} is not in this run; choose a prompt index below the number of "
                             "prompts")
        p = found[0]
        return pca_of_states(p["states"], p["R"], p["K"], p["P"], self.n_components)


def pca_of_states(x: torch.Tensor, R: int, K: int, P: int, n_components: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PCA (fp64 SVD of the centred finite rows) of one token's block states x [R·K, D] in realized order."""
    good = torch.isfinite(x).all(-1)
    coords = torch.full((R * K, n_components), float("nan"), dtype=torch.float64)
    ratio = torch.zeros(n_components, dtype=torch.float64)
    if int(good.sum()) >= 2:
        xs = x[good]
        xc = xs - xs.mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        k = min(n_components, vh.shape[0])
        v = vh[:k]
        sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
        coords[good, :k] = xc @ v.T
        total = (s ** 2).sum()
        if total > 0:
            ratio[:k] = (s[:k] ** 2) / total
    t = torch.arange(R).repeat_interleave(K)
    j = torch.arange(K).repeat(R)
    projections = pd.DataFrame({"recurrence": t.numpy(), "layer": j.numpy(), "depth": (P + t * K + j + 1).numpy()})
    for i in range(n_components):
        projections[f"pc{i + 1}"] = coords[:, i].numpy()
    variance = pd.DataFrame({"component": range(1, n_components + 1),
                             "explained_variance_ratio": ratio.numpy()})
    return projections, variance


def pca_trajectory(traj: Trajectory, batch: int = 0, token: int = -1, n_components: int = 6,
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PCA fit on the R·K block states X_{j,t} of one token (fp64 SVD of the centred states, torch.linalg.svd).

    token: a position in the prompt; negative values index the REAL tokens (-1 = the last real token).
    Returns
      projections: one row per (recurrence, layer) in realized order, columns [recurrence, layer, depth,
                   pc1..pc{n}] with pc_i = ⟨X_{j,t} − mean, v_i⟩ (depth = realized depth P + t·K + j + 1);
      variance:    columns [component (1..n, matching column pc{component}), explained_variance_ratio]
                   = σ_i² / Σ σ² (sorted, sums to ≤ 1).
    Each direction's sign is fixed so that its largest-magnitude loading is positive. Only finite states are
    fitted; non-finite states get NaN coordinates. Components beyond the rank available (min(#finite states,
    D)) get NaN coordinates and ratio 0.
    """
    if n_components < 1:
        raise InputError(f"n_components={n_components}: ask for at least 1")
    token_position(traj.mask, batch, token)
    return run_on_trajectory(TokenStates(batch, token, n_components), traj)
