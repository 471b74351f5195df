"""The principled behaviour classifier (`classify(method="dynamics")`): read each token's trajectory as an
orbit of a discrete dynamical system x_{t+1} = F(x_t) and test, in order, for divergence, a fixed point, a
periodic orbit and a slider (Geiping et al. 2025 §7 / Fig. 12 name the behaviours; Blayney et al. 2026 §3.4).

Input: one block layer's states x_t = X_{j,t} ∈ R^D, t = 0..R-1, of n tokens. Everything is measured on the
tail window t ∈ [R-W, R-1] (W = `window`, default max(4, R // 2)), so transients are ignored. Let
s_t = x_t − x_{t-1} be the steps in the window and scale = max_t ‖x_t‖ over the window.

    divergent    any non-finite value at any recurrence, or growth > runaway_factor, where
                 growth = max ‖x_t‖ over the window's second half / max ‖x_t‖ over its first half
                 (a linear drift gives ≤ ~1.3 at the default window; an expansion by λ per step gives λ^{W/2},
                 so it is detected once λ^{W/2} > runaway_factor, e.g. λ = 1.5 needs W ≥ 12).
    fixed_point  tail_relative_step < fixed_tol, with tail_relative_step = max over the last `settle` steps
                 of ‖s_t‖ / scale (the steps have shrunk to below a tolerance relative to the state norm).
                 An orbit or drift whose steps are below fixed_tol·scale is, at that tolerance, a fixed point.
    orbit        the state returns close to an earlier state: for p = 2..min(max_period, W // 2)
                 return_error(p) = sqrt(mean_t ‖x_t − x_{t−p}‖²) / sqrt(mean_t ‖s_t‖²) over pairs inside the
                 window; the period is the smallest p with return_error(p) < orbit_tol (multiples of the
                 period also return; the smallest is the period). p = 1 with tiny steps is the fixed point
                 above, which is tested first. Measuring returns against the step size (not the state norm)
                 makes small orbits around a large offset detectable.
    slider       sustained drift: step_cosine ≥ slider_cosine (mean cos(s_t, s_{t−1}), consistent direction),
                 straightness ≥ slider_straightness (‖x_{R-1} − x_{R-W}‖ / Σ‖s_t‖, displacement grows
                 linearly with steps) and step_ratio ≥ slider_step_ratio (mean ‖s_t‖ over the last third of the
                 window / over the first third: the steps do not shrink, which separates a slider from a
                 slow geometric convergence).
    unknown      anything else (chaotic motion, slow convergence not yet within fixed_tol, quasi-periodic
                 motion with no period ≤ max_period).

Defaults (`DynamicsThresholds`): window R // 2, runaway_factor 10, fixed_tol 1e-2, settle 4, orbit_tol 0.1,
max_period 16, slider_cosine 0.9, slider_straightness 0.9, slider_step_ratio 0.8. They leave a ≥ 2× margin on
the noisy test systems (R = 64, D = 8, 100 noise seeds: a contraction plus Gaussian noise σ = 1e-3 reaches
tail_relative_step ≤ 0.0047; unit rotations plus σ = 1e-2 reach return_error ≤ 0.051). orbit_tol is 0.1 rather
than looser because random-init looped models (sandwich norm, 12-layer block) produce aperiodic motion with
return errors of 0.15–0.5 that a looser tolerance would call orbits; a golden-angle rotation's best return
within 16 steps (≈ 0.116) is, correctly, not an orbit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopscope.dynamics._tokens import cosine, norm
from loopscope.errors import InputError

BEHAVIOURS = ("fixed_point", "orbit", "slider", "divergent", "unknown")
FIXED, ORBIT, SLIDER, DIVERGENT, UNKNOWN = range(5)


@dataclass(frozen=True)
class DynamicsThresholds:
    """Thresholds of the dynamics classifier (keyword arguments of `classify(method="dynamics")`)."""

    window: int | None = None  # tail length in recurrences; None = max(4, R // 2)
    runaway_factor: float = 10.0  # norm growth across the window that counts as divergence
    fixed_tol: float = 1e-2  # relative step size below which the state is at a fixed point
    settle: int = 4  # the fixed-point test uses the largest of the last `settle` relative steps
    orbit_tol: float = 0.1  # return error (relative to the step size) below which the state has returned
    max_period: int = 16  # longest period searched (also capped at window // 2)
    slider_cosine: float = 0.9  # mean cosine between successive steps
    slider_straightness: float = 0.9  # net displacement / path length over the window
    slider_step_ratio: float = 0.8  # late / early mean step size (steps must not shrink)

    def window_for(self, R: int) -> int:
        W = max(4, R // 2) if self.window is None else int(self.window)
        if R < 4 or not 4 <= W <= R:
            raise InputError(f"window={W} with R={R} recurrences: the dynamics classifier needs 4 ≤ window ≤ R "
                             "(capture at least 4 recurrences; 32 or more separate behaviours reliably)")
        return W


@dataclass
class Labels:
    """Per-token result of a classifier: behaviour codes (index into BEHAVIOURS), period (0 = none) and
    named diagnostics, each a tensor [n]."""

    code: torch.Tensor
    period: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


def classify_states(x: torch.Tensor, th: DynamicsThresholds) -> Labels:
    """Classify every token of x [R, n, D] (one layer's states across recurrences); see the module doc."""
    R = x.shape[0]
    W = th.window_for(R)
    finite = torch.isfinite(x).all(-1).all(0)  # [n]
    tail = x[R - W:]  # [W, n, D]
    tail_norm = norm(tail)  # [W, n]
    half = W // 2
    growth = tail_norm[half:].amax(0) / tail_norm[:half].amax(0)
    steps = tail[1:] - tail[:-1]  # [W-1, n, D]
    step_norm = norm(steps)  # [W-1, n]
    scale = tail_norm.amax(0)
    rel_step = torch.where(step_norm == 0, torch.zeros_like(step_norm), step_norm / scale)
    settle = max(1, min(th.settle, W - 1))
    tail_rel = rel_step[-settle:].amax(0)

    # orbit: returns after p steps, measured against the typical step
    step_rms = step_norm.pow(2).mean(0).sqrt()
    pmax = min(th.max_period, W // 2)
    errors = torch.full((max(pmax - 1, 0), x.shape[1]), float("inf"), dtype=x.dtype)
    for i, p in enumerate(range(2, pmax + 1)):
        back = norm(tail[p:] - tail[:-p]).pow(2).mean(0).sqrt()
        errors[i] = back / step_rms
    returns = errors < th.orbit_tol
    has_period = returns.any(0)
    first = returns.to(torch.int8).argmax(0)  # first p passing (argmax returns the first max)
    period = torch.where(has_period, first + 2, torch.zeros_like(first))
    if errors.shape[0]:
        best = torch.where(has_period, errors.gather(0, first[None])[0], errors.nan_to_num(nan=float("inf")).amin(0))
    else:
        best = torch.full_like(scale, float("nan"))

    # slider: consistent, non-shrinking, straight drift
    step_cos = cosine(steps[1:], steps[:-1]).mean(0)
    straightness = norm(tail[-1] - tail[0]) / step_norm.sum(0)
    third = max(1, (W - 1) // 3)
    step_ratio = step_norm[-third:].mean(0) / step_norm[:third].mean(0)

    divergent = ~finite | (growth > th.runaway_factor)
    fixed = ~divergent & (tail_rel < th.fixed_tol)
    orbit = ~divergent & ~fixed & has_period
    slider = (~divergent & ~fixed & ~orbit & (step_cos >= th.slider_cosine)
              & (straightness >= th.slider_straightness) & (step_ratio >= th.slider_step_ratio))
    code = torch.full_like(period, UNKNOWN)
    for mask, value in ((slider, SLIDER), (orbit, ORBIT), (fixed, FIXED), (divergent, DIVERGENT)):
        code = torch.where(mask, torch.full_like(code, value), code)
    period = torch.where(orbit, period, torch.zeros_like(period))
    return Labels(code=code, period=period, diagnostics={
        "final_norm": norm(x[-1]),
        "final_relative_step": rel_step[-1],
        "tail_relative_step": tail_rel,
        "growth": growth,
        "return_error": best,
        "step_cosine": step_cos,
        "straightness": straightness,
        "step_ratio": step_ratio,
    })
