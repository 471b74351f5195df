"""Dynamical systems with exactly known behaviour, packed into Trajectories, to validate the analyses
(every classifier and metric in `loopscope.dynamics` is tested on these; they are also handy for demos).

Single-state systems return x [R, D] (one token, one layer); `cyclic_system` iterates K maps in a cycle like
a looped block and returns [R, K, n, D]; `trajectory_from_tokens` packs per-token states into
Trajectory.core [R, K, B, T, D] with right padding and the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from loopscope.capture.trajectory import Trajectory


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(D: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k orthonormal columns in R^D, [D, k]."""
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=gen, dtype=torch.float64))
    return q


def add_noise(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """x + N(0, noise²) on every coordinate (observation noise)."""
    return x if noise == 0 else x + noise * torch.randn(x.shape, generator=_gen(seed + 7919), dtype=x.dtype)


def add_state_noise(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """x_t + ε_t with ε_t ~ N(0, (noise·‖x_t‖)² / D · I): observation noise whose size is a share `noise` of each
    state's norm (‖ε_t‖ ≈ noise·‖x_t‖), as rounding a state to a low-precision dtype adds (bfloat16: ≈ 0.2–0.4 %)."""
    if noise == 0:
        return x
    size = noise * torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    return x + size * torch.randn(x.shape, generator=_gen(seed + 104729), dtype=x.dtype)


def round_to(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Each state rounded to `dtype` (round to nearest even) and back to x's dtype: what storing the state of a
    bfloat16 run does to it (a relative error of up to u = 2⁻⁸ per coordinate)."""
    return x.to(dtype).to(x.dtype)


def contraction(R: int, D: int, rho: float = 0.8, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """x_{t+1} = A x_t + b with A = rho·Q (Q random orthogonal: spectral radius rho < 1), x_0, b ~ N(0, I).
    Converges to the fixed point x* = (I − A)⁻¹ b."""
    g = _gen(seed)
    A = rho * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    b, x = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    out = []
    for _ in range(R):
        out.append(x)
        x = A @ x + b
    return add_noise(torch.stack(out), noise, seed)


def rotation(R: int, D: int, period: int, radius: float = 1.0, offset: float = 1.0, seed: int = 0,
             noise: float = 0.0) -> torch.Tensor:
    """x_t = c + radius·(cos(2πt/p + φ) u + sin(2πt/p + φ) v): rotation by 2π/p in the plane (u, v), the other
    coordinates fixed at c (‖c‖ = offset, c ⟂ u, v). Exactly periodic with period p."""
    g = _gen(seed)
    basis = _orthonormal(D, 3, g)
    u, v, c = basis[:, 0], basis[:, 1], offset * basis[:, 2]
    phase = float(torch.rand((), generator=g)) * 2 * math.pi
    t = torch.arange(R, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * t / period + phase
    return add_noise(c + radius * (angle.cos() * u + angle.sin() * v), noise, seed)


def drift(R: int, D: int, speed: float = 0.1, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """x_{t+1} = x_t + v, ‖v‖ = speed, x_0 ~ N(0, I): a slider."""
    g = _gen(seed)
    x0 = torch.randn(D, generator=g, dtype=torch.float64)
    v = speed * _orthonormal(D, 1, g)[:, 0]
    return add_noise(x0 + torch.arange(R, dtype=torch.float64)[:, None] * v, noise, seed)


def expansion(R: int, D: int, factor: float = 1.5, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """x_{t+1} = factor·x_t (divergent for factor > 1)."""
    x0 = torch.randn(D, generator=_gen(seed), dtype=torch.float64)
    return add_noise(factor ** torch.arange(R, dtype=torch.float64)[:, None] * x0, noise, seed)


def blow_up(R: int, D: int, at: int, value: float = float("inf"), seed: int = 0) -> torch.Tensor:
    """A contraction whose state becomes `value` (inf or nan) from recurrence `at` on."""
    x = contraction(R, D, seed=seed).clone()
    x[at:, 0] = value
    return x


def cyclic_system(maps: Sequence[Callable[[torch.Tensor], torch.Tensor]], x0: torch.Tensor, R: int) -> torch.Tensor:
    """Run a K-layer block of maps cyclically: s ← f_j(s) for j = 0..K-1, R times, from s = x0 [n, D].
    Returns the layer outputs [R, K, n, D] (layer j at recurrence t), as Trajectory.core with B = 1 sliced."""
    out = torch.empty(R, len(maps), *x0.shape, dtype=x0.dtype)
    s = x0
    for t in range(R):
        for j, f in enumerate(maps):
            s = f(s)
            out[t, j] = s
    return out


def trajectory_from_tokens(prompts: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype = torch.float32,
                           tokens: list[list[str]] | None = None) -> Trajectory:
    """Pack per-token states into a Trajectory: prompts[b][i] is token i of prompt b, states [R, D] (one block
    layer) or [R, K, D]. Prompts are right-padded with zeros and the mask marks the real tokens."""
    first = prompts[0][0]
    if first.ndim == 2:
        prompts = [[x[:, None] for x in row] for row in prompts]
        first = prompts[0][0]
    R, K, D = first.shape
    B, T = len(prompts), max(len(row) for row in prompts)
    core = torch.zeros(R, K, B, T, D, dtype=dtype)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(prompts):
        for i, x in enumerate(row):
            core[:, :, b, i] = x.to(dtype)
            mask[b, i] = True
    return Trajectory(core=core, mask=mask, tokens=tokens)
