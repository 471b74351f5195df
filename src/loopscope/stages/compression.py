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

from loopscope.accumulate.core import Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows, xlogx

COMPRESSION_METRICS = ["matrix_entropy", "matrix_entropy_normalised"]


def matrix_entropy(x: torch.Tensor) -> tuple[float, float]:
    """(H, H / log T) of x: (T, D) from its trace-normalised Gram spectrum; NaN where undefined."""
    h, h_norm = gram_entropies(gram_of(x.double())[None], x.shape[0]).tolist()[0]
    return h, h_norm


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of x (T, D) on its smaller side, XᵀX or XXᵀ: its eigenvalues are σ_i² of X either way.
    All zero for a non-finite x (a diverged loop has no spectrum; `gram_entropies` then gives NaN)."""
    gram = x.T @ x if x.shape[0] > x.shape[1] else x @ x.T
    return torch.where(torch.isfinite(x).all(), gram, torch.zeros((), dtype=gram.dtype, device=gram.device))


def gram_entropies(grams: torch.Tensor, T: int) -> torch.Tensor:
    """(H, H / log T) of a stack of Gram matrices [S, n, n] of T-token states → [S, 2], on their device: one
    eigendecomposition call for the stack on a GPU (where each call synchronises with the host); one per matrix on
    a CPU, where a batched call differs in the last bits with each matrix's place in the stack (alignment)."""
    if grams.device.type == "cpu":
        s2 = torch.stack([torch.linalg.eigvalsh(g) for g in grams]).clamp_min(0)
    else:
        s2 = torch.linalg.eigvalsh(grams).clamp_min(0)
    total = s2.sum(-1, keepdim=True)
    h = (-xlogx(s2 / total).sum(-1)).clamp_min(0)  # round-off can give −1e-16 for rank 1
    h = torch.where(total[:, 0] > 0, h, float("nan"))  # an all-zero (or non-finite) state has no spectrum
    return torch.stack([h, h / math.log(T) if T > 1 else torch.full_like(h, float("nan"))], dim=1)


class ResidualEntropy(PromptRows):
    """`matrix_entropy` of every state and prompt. Each state's Gram matrices are formed as it is produced, on its
    device; their spectra are taken together, one eigendecomposition per prompt (every state of the batch, or
    `gram_bytes` of them at a time), so a batch synchronises per prompt, not per state."""

    name = "residual_entropy"
    values = COMPRESSION_METRICS
    sites = frozenset({"resid_post", "embed"})
    gram_bytes = 2**30  # bytes of Gram matrices held per prompt before their spectra are taken

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self.grams: list[list[torch.Tensor]] = [[] for _ in self.positions]
        self.entropies: list[list[torch.Tensor]] = [[] for _ in self.positions]

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if not self.wants(site, step):
            return
        ids = self.ids(step)
        for b, prompt, pos, xb in self.prompts(x):
            self.rows.append({**ids, "batch": prompt, "n_tokens": len(pos)})
            gram = gram_of(xb.double())
            self.grams[b].append(gram)
            if len(self.grams[b]) * gram.numel() * gram.element_size() >= self.gram_bytes:
                self.spectra(b)

    def spectra(self, b: int) -> None:
        if self.grams[b]:
            self.entropies[b].append(gram_entropies(torch.stack(self.grams[b]), len(self.positions[b])))
            self.grams[b] = []

    def end(self) -> Part:
        for b in range(len(self.positions)):
            self.spectra(b)
        if self.rows:  # rows are state-major, then prompt: interleave the prompts' [states, 2]
            self.observed = [torch.stack([torch.cat(e) for e in self.entropies], dim=1).reshape(len(self.rows), 2)]
        return super().end()


def residual_entropy(traj: Trajectory, *, per_prompt: bool = False, include_embed: bool = False) -> pd.DataFrame:
    """Matrix-based entropy of every state. Columns: STATE_COLUMNS, `matrix_entropy_mean/_std`,
    `matrix_entropy_normalised_mean/_std`, `n` (prompts); per_prompt=True gives one raw row per
    (state, batch) with `n_tokens`."""
    return run_on_trajectory(ResidualEntropy(["batch"], raw=per_prompt, include_embed=include_embed), traj)
