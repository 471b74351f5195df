"""Attention matrices of real tokens and Frobenius distances between them (shared by similarity and convergence).

Two ways to treat heads, both Frobenius norms over real query rows × real key columns only:

    "stack":   ‖A − A'‖_F over heads × rows × columns  = sqrt(Σ_h ‖A_h − A'_h‖²_F)
    "average": ‖Ā − Ā'‖_F with Ā = (1/H) Σ_h A_h, the head-averaged pattern of the prompt
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError

HEAD_REDUCTIONS = ("stack", "average")
GRAM_ELEMENTS = 2**24  # fp64 elements per column block of a Gram product


def require_attention(traj: Trajectory) -> torch.Tensor:
    if traj.core_attention is None:
        raise InputError("this Trajectory has no attention; capture with attention=True")
    return traj.core_attention


def check_head_reduction(head_reduction: str) -> None:
    if head_reduction not in HEAD_REDUCTIONS:
        raise InputError(f"head_reduction={head_reduction!r}; choose one of {HEAD_REDUCTIONS}")


def prompt_patterns(traj: Trajectory, recurrences: slice, head_reduction: str,
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """For each prompt b with real tokens: (b, patterns [r, K, M]) flattened over (heads ×) real rows × real cols."""
    attn = require_attention(traj)
    check_head_reduction(head_reduction)
    for b in range(traj.batch_size):
        idx = traj.mask[b].nonzero(as_tuple=True)[0].to(attn.device)
        if idx.numel() == 0:
            continue
        a = attn[recurrences, :, b]  # [r, K, H, T, T] view
        a = a.index_select(-2, idx).index_select(-1, idx).to(device="cpu", dtype=torch.float64)  # [r, K, H, n, n]
        if head_reduction == "average":
            a = a.mean(dim=2)
        yield b, a.reshape(a.shape[0], a.shape[1], -1)


def gram(x: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """G = X Xᵀ in fp64 for X [N, M], accumulated over column blocks (optionally after subtracting the row
    mean over N from every column, which leaves pairwise distances unchanged and avoids cancellation)."""
    N, M = x.shape
    step = max(1, GRAM_ELEMENTS // max(N, 1))
    g = torch.zeros(N, N, dtype=torch.float64, device=x.device)
    for start in range(0, M, step):
        block = x[:, start:start + step].to(torch.float64)
        if centre:
            block = block - block.mean(0, keepdim=True)
        g += block @ block.T
    return g


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """‖x_a − x_b‖₂ for all rows a, b of X [N, M], fp64, via the centred Gram matrix."""
    g = gram(x, centre=True)
    sq = torch.diagonal(g)
    return (sq[:, None] + sq[None, :] - 2 * g).clamp(min=0).sqrt()
