"""The default behaviour detector (`classify(method="dynamics")`): read each token's trajectory x_{t+1} = F(x_t)
by how its step size evolves and by its return structure, never by one absolute size threshold, so that a token
already in its asymptotic regime gets the same label at R = 32, 64, 128 or 256 (Geiping et al. 2025 §7 / Fig. 12
name the behaviours; Blayney et al. 2026 §3.4, App. C).

Input per token: one block layer's states x_t, t = 0..R−1, read on the tail window t ∈ [R−W, R−1]
(W = `window`, default max(8, R // 2)); d_t = ‖x_t − x_{t−1}‖ are the window's W−1 steps, n̄ its mean norm.

1. Step-size trend. Fit log d̃_t = a + b·t by least squares over the window, with d̃_t = max(d_t, f·‖x_{t−1}‖):
   steps are clamped at the numerical floor f = floor_factor · u (u = unit roundoff of the dtype the states were
   computed in: 2⁻²⁴ float32, 2⁻⁸ bfloat16, 2⁻¹¹ float16, 2⁻⁵³ float64). `step_rate` = e^b is the per-recurrence
   factor of the step size: the contraction rate of a converging token, > 1 for an expanding one. se(b) is the
   least-squares standard error, so a trend counts only when it clears noise: decaying if b + z·se < −margin,
   growing if b − z·se > margin.
2. Labels, in order:
   divergent    any non-finite state at any recurrence, or growing steps (x_t = λ^t x_0: step_rate = λ at any R).
   fixed_point  every window step at the floor (no motion the dtype can resolve), or decaying steps (geometric
                convergence, however far it still has to go), or — steady steps — noise-like motion (mean cosine
                between successive steps ≤ rough_cosine; white noise around a point gives −½) whose level
                noise_level = rms(d) / (√2 · n̄) (the noise per coordinate relative to the state) ≤ noise_tol.
   orbit        steady steps that return: return_error(p) = rms_t ‖x_t − x_{t−p}‖ / rms(d) < orbit_tol for a
                period p = 2..min(max_period, W // 2) (the smallest p is the period); or, with no exact period,
                quasi-periodic motion (period <NA>): a near-return (min_p return_error < quasi_tol; noise around a
                point returns no closer than its own step, ≈ 1), or smooth (step cosine ≥ smooth_cosine) curved
                (straightness < slider_straightness) motion.
   slider       steady steps, step cosine ≥ slider_cosine and straightness = ‖x_{R−1} − x_{R−W}‖ / Σ d_t ≥
                slider_straightness: a sustained drift in one direction.
   unknown      anything else (e.g. rough motion too large to be noise on a fixed point: chaos, i.i.d. states).

What a steady x_t = x_0 + v·t is: a slider at every R (the old detector's relative-size test made it a fixed point
once ‖v‖/‖x_t‖ ≈ 1/t fell below its tolerance, at R ≳ 100). Everything is scale-free (ratios of norms), so a
system and its copies scaled by 10⁻³ or 10⁴ get the same labels. The statistics are accumulated state by state
(a ring buffer of the last max_period states of the window), so memory does not grow with R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loopscope.dynamics.precision import unit_roundoff
from loopscope.errors import InputError

BEHAVIOURS = ("fixed_point", "orbit", "slider", "divergent", "unknown")
FIXED, ORBIT, SLIDER, DIVERGENT, UNKNOWN = range(5)
MIN_RECURRENCES = 8

@dataclass(frozen=True)
class DynamicsThresholds:
    """Thresholds of the dynamics detector (keyword arguments of `classify(method="dynamics")`), each with its reason.

    window and max_period shape what is collected; the rest only decide, so a sweep over them reuses one run."""

    window: int | None = None  # tail length; None = max(8, R // 2): the second half is past most transients
    max_period: int = 16  # longest period searched (capped at window // 2 so every lag has ≥ W/2 pairs)
    floor_factor: float = 16.0  # relative steps ≤ 16·u are rounding: a float32 block recomputed on its own fixed
    #                             point moves by a few u per layer
    z: float = 3.0  # standard errors a step-size trend must clear (false trend on a steady drift: 0.13 % one-sided)
    rate_margin: float = 1e-3  # and |log step rate| > 0.1 % per recurrence: slower trends cannot show in R ≤ 256
    orbit_tol: float = 0.1  # return within 10 % of the typical step: exact returns give 0, noise 1–5 % gives ≤ 0.07
    slider_cosine: float = 0.9  # successive steps point the same way (a drift with 10 % step noise: ≈ 0.99)
    slider_straightness: float = 0.9  # net displacement ≈ path length (bounded motion: ≪ 1)
    quasi_tol: float = 0.5  # a near-return within half a step: quasi-periodic (golden-angle rotation: 0.116)
    smooth_cosine: float = 0.5  # smooth motion (a rotation by θ: cos θ; θ < 60°) with no exact period: quasi-periodic
    rough_cosine: float = 0.0  # noise-like motion (white noise around a point: −½; smooth motion: > 0)
    noise_tol: float = 0.1  # noise up to 10 % of the state is noise on a fixed point (the paper's heuristic keeps 5 %)

    def window_for(self, R: int) -> int:
        W = max(MIN_RECURRENCES, R // 2) if self.window is None else int(self.window)
        if R < MIN_RECURRENCES or not MIN_RECURRENCES <= W <= R:
            raise InputError(f"window={W} with R={R} recurrences: the dynamics detector needs {MIN_RECURRENCES} ≤ "
                             f"window ≤ R (capture at least {MIN_RECURRENCES} recurrences; 32 or more separate "
                             "behaviours reliably)")
        return W

    def period_cap(self, W: int) -> int:
        return max(1, min(self.max_period, W // 2))


@dataclass
class Labels:
    """Per-token result of a classifier: behaviour codes (index into BEHAVIOURS), period (0 = none) and
    named diagnostics, each a tensor [n]."""

    code: torch.Tensor
    period: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


class WindowStats:
    """Running per-token statistics of one layer's tail window, fed one recurrence at a time (`add`)."""

    FIELDS = ("finite", "norm_sum", "norm_first_max", "norm_second_max", "final_norm", "steps", "step_sum",
              "step_sq", "rel_max", "s1", "s2", "sy", "sty", "syy", "cos_sum", "cos_count", "returns",
              "return_count", "displacement", "final_step")

    def __init__(self, R: int, th: DynamicsThresholds, n: int, floor: float,
                 keep_dtype: torch.dtype = torch.float64) -> None:
        self.R, self.W = R, th.window_for(R)
        self.keep_dtype = keep_dtype
        self.start = R - self.W
        self.P = th.period_cap(self.W)
        self.floor = floor
        f64 = dict(dtype=torch.float64)
        self.finite = torch.ones(n, dtype=torch.bool)
        for name in ("norm_sum", "norm_first_max", "norm_second_max", "final_norm", "step_sum", "step_sq",
                     "rel_max", "s1", "s2", "sy", "sty", "syy", "cos_sum", "cos_count", "displacement",
                     "final_step"):
            setattr(self, name, torch.zeros(n, **f64))
        self.norm_first_max.fill_(-math.inf)
        self.norm_second_max.fill_(-math.inf)
        self.steps = 0
        self.returns = torch.zeros(max(self.P - 1, 0), n, **f64)  # Σ ‖x_t − x_{t−p}‖², p = 2..P
        self.return_count = torch.zeros(max(self.P - 1, 0), **f64)
        self.ring: torch.Tensor | None = None  # the last P states of the window, [P, n, D], written round-robin
        self.stored = 0  # states written into the ring so far
        self.previous: torch.Tensor | None = None  # x_{t−1} in float64, for the step
        self.previous_norm: torch.Tensor | None = None
        self.previous_step: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None

    def add(self, t: int, x: torch.Tensor) -> None:
        """State x [n, D] (float64, any device) at recurrence t; recurrences arrive in order 0..R−1."""
        self.finite &= torch.isfinite(x.sum(-1)).cpu()  # a non-finite entry makes the sum non-finite
        if t < self.start:
            return
        nx = torch.linalg.vector_norm(x, dim=-1)
        n64 = nx.double().cpu()
        self.norm_sum += n64
        half = self.start + self.W // 2
        if t < half:
            self.norm_first_max = torch.maximum(self.norm_first_max, n64)
        else:
            self.norm_second_max = torch.maximum(self.norm_second_max, n64)
        if t == self.start:
            self.anchor = x
        kept = x.to(self.keep_dtype)
        if t > self.start:
            step = x - self.previous
            d = torch.linalg.vector_norm(step, dim=-1).double().cpu()
            n_prev = self.previous_norm
            rel = torch.where(d == 0, torch.zeros_like(d), d / n_prev)
            rel = torch.nan_to_num(rel, nan=math.inf)
            self.rel_max = torch.maximum(self.rel_max, rel)
            clamped = torch.maximum(d, self.floor * n_prev).clamp_min(1e-300)
            y = torch.log(clamped)
            tt = float(t)
            self.s1 += tt
            self.s2 += tt * tt
            self.sy += y
            self.sty += tt * y
            self.syy += y * y
            self.steps += 1
            self.step_sum += d
            self.step_sq += d * d
            self.final_step = d
            if self.previous_step is not None:
                c = _cosine(step, self.previous_step)
                valid = torch.isfinite(c)
                self.cos_sum += torch.where(valid, c, torch.zeros_like(c))
                self.cos_count += valid.double()
            self.previous_step = step
            lags = [p for p in range(2, self.P + 1) if t - p >= self.start]
            if lags:  # every slot at once (no gather): x_{t−p} sits p slots behind the next write position
                dist = torch.linalg.vector_norm(kept[None] - self.ring, dim=-1).double().cpu()  # [P, n]
                rows = [(self.stored - p) % self.P for p in lags]
                self.returns[[p - 2 for p in lags]] += dist[rows] ** 2
                self.return_count[[p - 2 for p in lags]] += 1
        if t == self.R - 1:
            self.final_norm = n64
            self.displacement = torch.linalg.vector_norm(x - self.anchor, dim=-1).double().cpu()
        # the last P states, in the dtype the model computed them in (a float32 state is exact in float32)
        if self.ring is None:  # unwritten slots are never read (lags ≤ states stored), zeros keep them finite
            self.ring = torch.zeros((self.P, *kept.shape), dtype=self.keep_dtype, device=kept.device)
        self.ring[self.stored % self.P] = kept
        self.stored += 1
        self.previous, self.previous_norm = x, n64

    def state(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in self.FIELDS if k not in ("steps",)}
        out["steps"] = torch.tensor(self.steps)
        out["window"] = torch.tensor([self.W, self.P, self.R])
        out["floor"] = torch.tensor(self.floor, dtype=torch.float64)
        return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = (a * b).sum(-1)
    return (dot / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))).double().cpu()


def decide(stats: dict[str, torch.Tensor], th: DynamicsThresholds) -> Labels:
    """Labels from the window statistics of `WindowStats` (concatenated over batches); see the module doc."""
    W, P, R = (int(v) for v in stats["window"])
    finite = stats["finite"].bool()
    m = float(stats["steps"])  # steps in the window: W − 1
    s0 = torch.full_like(stats["s1"], m)
    tbar, ybar = stats["s1"] / s0, stats["sy"] / s0
    stt = stats["s2"] - s0 * tbar * tbar
    sty = stats["sty"] - s0 * tbar * ybar
    syy = stats["syy"] - s0 * ybar * ybar
    slope = sty / stt
    resid = (syy - slope * sty).clamp_min(0.0)
    se = (resid / max(m - 2, 1) / stt).sqrt()
    floor = float(stats["floor"])
    at_floor = stats["rel_max"] <= floor
    growing = (slope - th.z * se > th.rate_margin) & ~at_floor
    decaying = (slope + th.z * se < -th.rate_margin) & ~at_floor

    rms_step = (stats["step_sq"] / m).sqrt()
    if stats["returns"].shape[0]:
        ret = (stats["returns"] / stats["return_count"][:, None].clamp_min(1)).sqrt() / rms_step
        ret = torch.nan_to_num(ret, nan=math.inf)
        passing = ret < th.orbit_tol
        has_period = passing.any(0)
        first = passing.to(torch.int8).argmax(0)
        period = torch.where(has_period, first + 2, torch.zeros_like(first))
        best = torch.where(has_period, ret.gather(0, first[None])[0], ret.amin(0))
    else:
        has_period = torch.zeros_like(finite)
        period = torch.zeros(finite.shape, dtype=torch.long)
        best = torch.full(finite.shape, math.nan, dtype=torch.float64)
    step_cos = stats["cos_sum"] / stats["cos_count"].clamp_min(1)
    straight = torch.where(stats["step_sum"] > 0, stats["displacement"] / stats["step_sum"],
                           torch.zeros_like(stats["step_sum"]))
    mean_norm = stats["norm_sum"] / W
    noise = torch.where(mean_norm > 0, rms_step / (math.sqrt(2) * mean_norm), torch.full_like(rms_step, math.inf))

    divergent = ~finite | growing
    fixed = ~divergent & (at_floor | decaying)
    steady = ~divergent & ~fixed
    exact_orbit = steady & has_period
    rest = steady & ~exact_orbit
    slider = rest & (step_cos >= th.slider_cosine) & (straight >= th.slider_straightness)
    quasi = rest & ~slider & ((best < th.quasi_tol)
                              | ((step_cos >= th.smooth_cosine) & (straight < th.slider_straightness)))
    noisy_fixed = rest & ~slider & ~quasi & (step_cos <= th.rough_cosine) & (noise <= th.noise_tol)
    fixed = fixed | noisy_fixed
    orbit = exact_orbit | quasi
    code = torch.full(finite.shape, UNKNOWN, dtype=torch.long)
    for mask, value in ((slider, SLIDER), (orbit, ORBIT), (fixed, FIXED), (divergent, DIVERGENT)):
        code = torch.where(mask, torch.full_like(code, value), code)
    growth = stats["norm_second_max"] / stats["norm_first_max"]
    return Labels(code=code, period=torch.where(exact_orbit, period, torch.zeros_like(period)), diagnostics={
        "final_norm": stats["final_norm"],
        "final_relative_step": stats["final_step"] / stats["final_norm"],
        "step_rate": slope.exp(),
        "step_rate_se": se,
        "at_floor": at_floor.double(),
        "noise_level": noise,
        "return_error": best,
        "step_cosine": step_cos,
        "straightness": straight,
        "growth": growth,
    })


def classify_states(x: torch.Tensor, th: DynamicsThresholds, dtype: torch.dtype | None = None) -> Labels:
    """Classify every token of x [R, n, D] (one layer's states across recurrences) in one go."""
    R, n, _ = x.shape
    stats = WindowStats(R, th, n, th.floor_factor * unit_roundoff(dtype or x.dtype))
    for t in range(R):
        stats.add(t, x[t])
    return decide(stats.state(), th)
