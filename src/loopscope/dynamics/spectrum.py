"""The stability certificate: leading eigenvalues of the block map's Jacobian at a token's fixed point, and what
they predict (Blayney et al. 2026 leave open *why* injection and norm placement decide stability, §8).

For a state s* with F(s*) ≈ s* (F = one recurrence of the block, the injected input held fixed), the linearisation
s_{t+1} − s* ≈ J (s_t − s*), J = ∂F/∂s at s*, decides what a small perturbation does:

    ρ = |λ₁| < 1       a stable fixed point; the step size shrinks by ρ per recurrence (what the detector's
                       `step_rate` measures on the trajectory)
    ρ ≈ 1, λ₁ complex  marginal: a rotation by arg λ₁ per recurrence, an orbit of period 2π / |arg λ₁|
    ρ ≈ 1, λ₁ real     marginal: λ₁ ≈ +1 a neutral direction (a slider), λ₁ ≈ −1 a period-2 flip
    ρ > 1              unstable: the state leaves s* (divergence, or a bounded orbit around it)

Causal attention makes the whole sequence's Jacobian block lower-triangular over tokens (token i's next state
depends on tokens ≤ i), so its spectrum is the union of the diagonal blocks' spectra: token i's certificate is the
spectrum of J_ii = ∂F(s)_i/∂s_i (D × D), with every other token at its own state.

J_ii is never formed: Arnoldi iteration (Saad, Numerical Methods for Large Eigenvalue Problems, §6.2) builds an
m-dimensional Krylov basis from matrix-vector products only and returns the Ritz values, whose outermost converge
to the eigenvalues of largest magnitude. Jᵀ has the same eigenvalues as J, so the products may be vector-Jacobian
products (reverse mode, `torch.func.vjp`), which the fused attention kernel supports on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


def arnoldi(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, dim: int, steps: int = 24, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Ritz values [n, m] (complex, largest magnitude first) of n independent operators at once: `matvec` maps a
    batch of vectors [n, dim] to [n, dim]. Modified Gram–Schmidt, applied twice (re-orthogonalisation); a basis that
    closes early (an invariant subspace) stops adding vectors for that operator."""
    m = min(steps, dim)
    gen = torch.Generator().manual_seed(seed)
    V = torch.zeros(n, m + 1, dim, dtype=dtype, device=device)
    H = torch.zeros(n, m + 1, m, dtype=dtype, device=device)
    v = torch.randn(n, dim, generator=gen, dtype=dtype).to(device)
    V[:, 0] = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    for k in range(m):
        w = matvec(V[:, k]).to(dtype)
        for _ in range(2):
            for j in range(k + 1):
                h = (V[:, j] * w).sum(-1)
                H[:, j, k] += h
                w = w - h[:, None] * V[:, j]
        norm = torch.linalg.vector_norm(w, dim=-1)
        scale = norm.abs().amax() if n else norm.new_tensor(1.0)
        closed = norm <= 1e-12 * torch.clamp(scale, min=1e-300)
        alive = alive & ~closed
        H[:, k + 1, k] = torch.where(alive, norm, torch.zeros_like(norm))
        V[:, k + 1] = torch.where(alive[:, None], w / torch.clamp(norm, min=1e-300)[:, None], torch.zeros_like(w))
    Hm = H[:, :m, :m].detach().cpu().double()
    finite = torch.isfinite(Hm).all(-1).all(-1)  # a non-finite state (an overflowed loop) has no spectrum: NaN
    ritz = torch.linalg.eigvals(torch.where(finite[:, None, None], Hm, torch.zeros_like(Hm)))
    ritz = torch.where(finite[:, None], ritz, torch.full_like(ritz, complex(float("nan"), float("nan"))))
    order = ritz.abs().argsort(dim=-1, descending=True)
    return ritz.gather(-1, order)


def power_rate(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, dim: int, steps: int = 60, seed: int = 1,
               dtype: torch.dtype = torch.float64, tail: int = 10) -> torch.Tensor:
    """The growth factor of a perturbation, (‖J^k v‖ / ‖J^(k−tail) v‖)^(1/tail) at k = steps (→ ρ once the
    dominant direction has taken over; averaging `tail` steps smooths the oscillation of a complex pair), [n]."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, dim, generator=gen, dtype=dtype)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    log_growth = torch.zeros(n, dtype=torch.float64)
    for k in range(steps):
        v = matvec(v).to(dtype)
        size = torch.linalg.vector_norm(v, dim=-1)
        if k >= steps - tail:
            log_growth += torch.log(torch.clamp(size, min=1e-300)).double()
        v = v / torch.clamp(size, min=1e-300)[:, None]
    return torch.exp(log_growth / tail)


@dataclass(frozen=True)
class CertificateThresholds:
    """What the leading eigenvalue must clear, fixed before any run."""

    marginal: float = 0.02  # |ρ − 1| ≤ 2 %: neither clearly contracting nor expanding over ~50 recurrences
    residual: float = 1e-3  # ‖F(s*) − s*‖ / ‖s*‖ above this: s* is not a fixed point, the linearisation says little
    complex_tol: float = 1e-3  # |arg λ₁| above this (radians): a rotation, not a real eigenvalue


def predict(ritz: torch.Tensor, residual: torch.Tensor, th: CertificateThresholds = CertificateThresholds()
            ) -> pd.DataFrame:
    """One row per operator: rho = |λ₁|, lambda_real, lambda_imag, angle = arg λ₁, predicted_period (2π/|arg| for a
    marginal complex pair), second_modulus (|λ₂|), residual, predicted (stable fixed point | marginal rotation |
    marginal neutral | marginal flip | unstable | not at a fixed point)."""
    ritz = ritz.detach()
    lead = ritz[:, 0]
    rho = lead.abs().numpy()
    angle = np.angle(lead.numpy())
    second = ritz[:, 1].abs().numpy() if ritz.shape[1] > 1 else np.full(len(rho), np.nan)
    res = residual.double().cpu().numpy()
    labels, periods = [], []
    for r, a, e in zip(rho, angle, res):
        period = np.nan
        if not np.isfinite(e) or e > th.residual:
            label = "not at a fixed point"
        elif r < 1 - th.marginal:
            label = "stable fixed point"
        elif r > 1 + th.marginal:
            label = "unstable"
        elif abs(a) > th.complex_tol and abs(abs(a) - math.pi) > th.complex_tol:
            label, period = "marginal rotation", 2 * math.pi / abs(a)
        elif abs(a) <= th.complex_tol:
            label = "marginal neutral"
        else:
            label, period = "marginal flip", 2.0
        labels.append(label)
        periods.append(period)
    return pd.DataFrame({"rho": rho, "lambda_real": lead.real.numpy(), "lambda_imag": lead.imag.numpy(),
                         "angle": angle, "predicted_period": periods, "second_modulus": second, "residual": res,
                         "predicted": labels})


# what each prediction agrees with among the detector's labels
AGREES = {"stable fixed point": {"fixed_point"}, "marginal rotation": {"orbit"}, "marginal flip": {"orbit"},
          "marginal neutral": {"slider", "fixed_point"}, "unstable": {"divergent", "orbit", "unknown", "slider"},
          "not at a fixed point": {"orbit", "slider", "divergent", "unknown"}}


def agreement(certificate: pd.DataFrame, behaviour: pd.DataFrame) -> pd.DataFrame:
    """Join the certificate (columns batch, token, predicted, rho) with the detector's labels (`classify`): per
    token, `agrees` (the prediction admits the label) and the observed step-size rate beside the predicted ρ
    (`at_floor`: the token's steps reached the rounding floor, where the measured rate is the floor's, not ρ)."""
    cols = ["batch", "token", "behaviour", "period", "step_rate", "at_floor"]
    joined = certificate.merge(behaviour[[c for c in cols if c in behaviour.columns]], on=["batch", "token"],
                               how="left", validate="one_to_one")
    joined["agrees"] = [b in AGREES[p] for p, b in zip(joined["predicted"], joined["behaviour"])]
    return joined


def agreement_table(joined: pd.DataFrame) -> pd.DataFrame:
    """Counts of (predicted, detector label) with the fraction that agree."""
    table = pd.crosstab(joined["predicted"], joined["behaviour"])
    table["agree"] = joined.groupby("predicted")["agrees"].mean()
    return table.reset_index()
