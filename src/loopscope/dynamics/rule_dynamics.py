"""The default behaviour detector (`classify(method="dynamics")`): read each token's trajectory x_{t+1} = F(x_t)
by how its step size evolves and by its return structure, never by one absolute size threshold, so that a token
already in its asymptotic regime gets the same label at R = 32, 64, 128 or 256 (Geiping et al. 2025 §7 / Fig. 12
name the behaviours; Blayney et al. 2026 §3.4, App. C).

Input per token: one block layer's states x_t, t = 0..R−1, read on the tail window t ∈ [R−W, R−1]
(W = `window`, default max(8, R // 2)); d_t = ‖x_t − x_{t−1}‖ are the window's W−1 steps, n̄ its mean norm.

1. Step-size trend. Fit log d̃_t = a + b·t by least squares over the window, with d̃_t = max(d_t, u·‖x_{R−W}‖):
   steps are clamped at the state's rounding (u = unit roundoff of the dtype the states were computed in: 2⁻²⁴
   float32, 2⁻⁸ bfloat16, 2⁻¹¹ float16, 2⁻⁵³ float64) of the window's first state — a fixed level, so a slide
   whose steps sit below it does not inherit its norm's growth; the numerical floor is f = floor_factor · u.
   `step_rate` = e^b is the per-recurrence
   factor of the step size: the contraction rate of a converging token, > 1 for an expanding one. se(b) is the
   least-squares standard error, so a trend counts only when it clears noise: decaying if b + z·se < −margin,
   growing if b − z·se > margin.
2. Labels, in order:
   at_floor     no motion the state's dtype resolves: every window step at the floor, and no trend over the
                window (drift_f or step_drift_f below, `_drift`) whose net displacement ‖x_{R−1} − x_{R−W}‖ exceeds
                the state's own rounding u·n̄; or steps all under the floor whose motion reads as noise (below). A
                fixed point as far as the precision can tell, never a confident `fixed_point`: in bfloat16 (f =
                16·2⁻⁸ ≈ 6 %) a slide of 0.2 % per step is below the floor step by step, and is a slider once the
                window's drift clears its noise and moves the state by more than u ≈ 0.4 %.
   divergent    any non-finite state at any recurrence, or growing steps (x_t = λ^t x_0: step_rate = λ at any R).
   fixed_point  decaying steps (geometric
                convergence, however far it still has to go), or — steady steps — noise-like motion (mean cosine
                between successive steps ≤ rough_cosine; white noise around a point gives −½) whose level
                noise_level = rms(d) / (√2 · n̄) (the noise per coordinate relative to the state) ≤ noise_tol.
   orbit        steady steps that return: return_error(p) = rms_t ‖x_t − x_{t−p}‖ / rms(d) < orbit_tol for a
                period p = 2..min(max_period, W // 2), or — an exact period seen through noise — < quasi_tol with
                every multiple of p in range returning as closely (`_period`); the period is the smallest lag
                consistent with the data (a divisor of the returning lag that returns as closely wins: noise must
                not turn a period 5 into a 15); or, with no exact period,
                quasi-periodic motion (period <NA>): a near-return (min_p return_error < quasi_tol; noise around a
                point returns no closer than its own step, ≈ 1), or smooth (step cosine ≥ smooth_cosine) curved
                (straightness < slider_straightness) motion.
   slider       steady steps, step cosine ≥ slider_cosine and straightness = ‖x_{R−1} − x_{R−W}‖ / Σ d_t ≥
                slider_straightness: a sustained drift in one direction; or a drift that noise hides step by step
                but not over the window (`_drift`, checked before the orbit and noise tests): a straight line fitted
                to the window's states carries drift_f× the energy their residual noise puts in a line, does not
                turn, and keeps its speed (end velocity within [½, 2]× the mean: a converging transient slows), or
                the same of the steps (mean step against the steps' spread: noise in the steps, a random walk with
                drift). Noise ∝ the state (bfloat16 rounding) grows or shrinks the steps of a sliding state with
                its norm; such a drift with noise-dominated steps (step cosine < smooth_cosine) is a slider, not
                divergent or converging.
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

BEHAVIOURS = ("fixed_point", "orbit", "slider", "divergent", "unknown", "at_floor")
FIXED, ORBIT, SLIDER, DIVERGENT, UNKNOWN, AT_FLOOR = range(6)
# a fixed point as far as the state's precision can tell: `at_floor` is a token that never moved by more than the
# rounding floor, in a step or over the window — it may be a fixed point, or a slide or orbit the dtype cannot see
FIXED_BEHAVIOURS = ("fixed_point", "at_floor")
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
    drift_f: float = 3.0  # a drift must carry 3× the energy noise alone puts there (F-statistic with D numerator
    #                       degrees of freedom: noise exceeds it with p ≈ 4e-5 at D = 16, 1e-8 at D = 32; a slide
    #                       with step noise 2× its step over a 16-step tail reaches ≈ 4.75)
    drift_persistence: float = 0.5  # the drift's end velocity within [½, 2]× its mean: a slide keeps its speed, a
    #                                 converging transient seen through noise slows (ρ = 0.9 over 16 steps: 0.36)
    period_slack: float = 0.5  # returns at lags within 1.5× the best one's are the same period seen through noise

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
              "return_count", "displacement", "final_step", "offset_sq", "turn_sq", "gram")
    # gram [n, 7]: the dot products the drift test needs (`_drift`) of the window sums below, taken at the
    # window's end so that a batch's result holds scalars per token, never D-dimensional vectors
    GRAM = ("a0a0", "a1a1", "a2a2", "a1a2", "ff", "ss", "fs")

    def __init__(self, R: int, th: DynamicsThresholds, n: int, floor: float,
                 keep_dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        self.R, self.W = R, th.window_for(R)
        self.keep_dtype = keep_dtype
        self.start = R - self.W
        self.P = th.period_cap(self.W)
        self.floor = floor
        self.clamp = floor / th.floor_factor  # u: the state's own rounding, below which a step has no size
        f64 = dict(dtype=torch.float64, device=device)  # every sum stays on the states' device until `state`
        self.finite = torch.ones(n, dtype=torch.bool, device=device)
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
        # Σ p_k(τ) (x_t − x_{R−W}) for the orthogonal polynomials p0 = 1, p1 = τ, p2 = τ² − (W² − 1)/12 of the
        # centred time τ = t − (R − W + (W − 1)/2), [n, D] each, and Σ ‖x_t − x_{R−W}‖², [n]: the drift test
        self.poly0 = self.poly1 = self.poly2 = None
        self.offset_sq = torch.zeros(n, **f64)
        # Σ of the steps in the first and second half of the window, [n, D], and Σ ‖s_t − s_{t−1}‖², [n]
        self.step_first = self.step_second = None
        self.turn_sq = torch.zeros(n, **f64)
        self.gram = torch.zeros(n, len(self.GRAM), **f64)
        self.dim = 0
        self.half = self.start + 1 + (self.W - 1) // 2  # the first step of the second half

    def add(self, t: int, x: torch.Tensor) -> None:
        """State x [n, D] (float64, any device) at recurrence t; recurrences arrive in order 0..R−1."""
        self.finite &= torch.isfinite(x.sum(-1))  # a non-finite entry makes the sum non-finite
        if t < self.start:
            return
        nx = torch.linalg.vector_norm(x, dim=-1)
        n64 = nx.double()
        self.norm_sum += n64
        half = self.start + self.W // 2
        if t < half:
            self.norm_first_max = torch.maximum(self.norm_first_max, n64)
        else:
            self.norm_second_max = torch.maximum(self.norm_second_max, n64)
        if t == self.start:
            self.anchor, self.anchor_norm = x, n64
            self.poly0, self.poly1, self.poly2 = (torch.zeros_like(x, dtype=torch.float64) for _ in range(3))
            self.step_first, self.step_second = (torch.zeros_like(x, dtype=torch.float64) for _ in range(2))
        offset = (x - self.anchor).double()
        tau = t - (self.start + (self.W - 1) / 2)
        self.poly0 += offset
        self.poly1 += tau * offset
        self.poly2 += (tau * tau - (self.W * self.W - 1) / 12) * offset
        self.offset_sq += (offset * offset).sum(-1)
        kept = x.to(self.keep_dtype)
        if t > self.start:
            step = x - self.previous
            d = torch.linalg.vector_norm(step, dim=-1).double()
            n_prev = self.previous_norm
            rel = torch.where(d == 0, torch.zeros_like(d), d / n_prev)
            rel = torch.nan_to_num(rel, nan=math.inf)
            self.rel_max = torch.maximum(self.rel_max, rel)
            clamped = torch.maximum(d, self.clamp * self.anchor_norm).clamp_min(1e-300)
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
            if t < self.half:
                self.step_first += step.double()
            else:
                self.step_second += step.double()
            if self.previous_step is not None:
                self.turn_sq += ((step - self.previous_step).double() ** 2).sum(-1)
                c = _cosine(step, self.previous_step)
                valid = torch.isfinite(c)
                self.cos_sum += torch.where(valid, c, torch.zeros_like(c))
                self.cos_count += valid.double()
            self.previous_step = step
            lags = [p for p in range(2, self.P + 1) if t - p >= self.start]
            if lags:  # every slot at once (no gather): x_{t−p} sits p slots behind the next write position
                dist = torch.linalg.vector_norm(kept[None] - self.ring, dim=-1).double()  # [P, n]
                rows = [(self.stored - p) % self.P for p in lags]
                self.returns[[p - 2 for p in lags]] += dist[rows] ** 2
                self.return_count[[p - 2 for p in lags]] += 1
        if t == self.R - 1:
            a0, a1, a2, f, s = self.poly0, self.poly1, self.poly2, self.step_first, self.step_second
            self.gram = torch.stack([(a0 * a0).sum(-1), (a1 * a1).sum(-1), (a2 * a2).sum(-1), (a1 * a2).sum(-1),
                                     (f * f).sum(-1), (s * s).sum(-1), (f * s).sum(-1)], dim=-1)
            self.dim = x.shape[-1]
            self.poly0 = self.poly1 = self.poly2 = self.step_first = self.step_second = None  # only the gram is kept
            self.final_norm = n64
            self.displacement = torch.linalg.vector_norm(x - self.anchor, dim=-1).double()
        # the last P states, in the dtype the model computed them in (a float32 state is exact in float32)
        if self.ring is None:  # unwritten slots are never read (lags ≤ states stored), zeros keep them finite
            self.ring = torch.zeros((self.P, *kept.shape), dtype=self.keep_dtype, device=kept.device)
        self.ring[self.stored % self.P] = kept
        self.stored += 1
        self.previous, self.previous_norm = x, n64

    def state(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in self.FIELDS if k not in ("steps",)}
        out["steps"] = torch.tensor(self.steps)
        out["window"] = torch.tensor([self.W, self.P, self.R, self.dim])
        out["floor"] = torch.tensor(self.floor, dtype=torch.float64)
        return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = (a * b).sum(-1)
    return (dot / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))).double()


PHI_MAX = 0.98  # the largest noise correlation the drift test corrects for (a factor of 99): beyond it the window
# (W ≥ 16 states) cannot tell a slow wander from a drift, and the test stays as it is


def _drift(stats: dict[str, torch.Tensor], W: int) -> dict[str, torch.Tensor]:
    """Least-squares fit of the window's states by a quadratic in time, x_t ≈ a + b·p1(τ) + c·p2(τ) (orthogonal
    polynomials, so each coefficient is its own projection: b = Σ p1·x / Σ p1², c likewise), and what it says
    about drift against noise (Draper & Smith, Applied Regression Analysis, §2.7: the F-test of a regression):

        σ²          = RSS / ((W − 3)·D), the residual noise per coordinate (RSS = what the fit leaves)
        drift_f     = Σp1²·‖b‖² / (D σ²): the straight drift's energy over what noise alone puts in a line
                      (≈ 1 for noise around a point; ~ F(D, (W − 3)·D) distributed)
        persistence = (b + c·(W − 1))·b / ‖b‖²: the fitted velocity at the window's end along the drift, over its
                      mean (1 for a straight slide; ρ^(W/2)-like for a converging transient)
        curvature_f = Σp2²·‖c⊥‖² / ((D − 1)·σ²), c⊥ = c minus its part along b: turning (an arc of a slow
                      rotation) over what noise puts there
        residual_noise = √(D σ²) / n̄: the noise relative to the state (n̄ the window's mean norm)"""
    tau = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    p2 = tau * tau - (W * W - 1) / 12
    s11, s22 = float((tau * tau).sum()), float((p2 * p2).sum())
    g = dict(zip(WindowStats.GRAM, stats["gram"].unbind(-1)))  # a_k = Σ p_k(τ)(x_t − x_{R−W}); f, s: step sums
    D = max(int(stats["window"][3]), 1)
    line = g["a1a1"] / s11
    bend = g["a2a2"] / s22
    rss = (stats["offset_sq"] - g["a0a0"] / W - line - bend).clamp_min(0.0)
    var = rss / max((W - 3) * D, 1)  # σ² per coordinate
    bb = g["a1a1"] / (s11 * s11)  # ‖b‖², b = a1 / Σp1²
    cb = g["a1a2"] / (s11 * s22)  # c·b, c = a2 / Σp2²
    cc = g["a2a2"] / (s22 * s22)
    persistence = torch.where(bb > 0, 1 + (W - 1) * cb / bb, torch.zeros_like(bb))
    c_perp_sq = (cc - torch.where(bb > 0, cb * cb / bb, torch.zeros_like(bb))).clamp_min(0.0)
    # Noise a contraction carries from step to step (each recurrence's rounding, contracted by ρ and added to the
    # next's) is AR(1) with lag-1 correlation φ ≈ ρ, not white: a fitted line then holds (1 + φ)/(1 − φ) times the
    # energy white noise of the same variance puts there (Box, Jenkins & Reinsel, Time Series Analysis, §7.3:
    # the variance of a mean or slope under AR(1) errors). φ from the steps: E‖x_t − x_{t−1}‖² = ‖b‖² + 2Dσ²(1 − φ)
    # (= ‖b‖² + 2Dσ² for white noise), clamped to [0, PHI_MAX]; both F-statistics are deflated by that factor.
    mean_step_sq = stats["step_sq"] / max(W - 1, 1)
    phi = torch.where(var > 0, 1 - (mean_step_sq - bb) / (2 * D * var).clamp_min(1e-300), torch.zeros_like(var))
    phi = torch.nan_to_num(phi, nan=0.0).clamp(0.0, PHI_MAX)
    inflation = (1 + phi) / (1 - phi)
    with torch.no_grad():
        drift_f = torch.where(var > 0, line / (D * var * inflation), torch.where(line > 0, math.inf, 0.0))
        curve = s22 * c_perp_sq
        curvature_f = torch.where(var > 0, curve / (max(D - 1, 1) * var * inflation),
                                  torch.where(curve > 0, math.inf, 0.0))
    mean_norm = stats["norm_sum"] / W
    noise = torch.where(mean_norm > 0, (D * var).sqrt() / mean_norm, torch.zeros_like(mean_norm))
    # the same questions asked of the steps, for noise in the steps themselves (a random walk with drift)
    h1, h2 = (W - 1) // 2, (W - 1) - (W - 1) // 2  # steps in each half
    ff, ss, fs = g["ff"], g["ss"], g["fs"]  # first- and second-half step sums f, s; the total is f + s
    tt = ff + ss + 2 * fs
    spread = ((stats["step_sq"] - tt / (W - 1)) / max((W - 2) * D, 1)).clamp_min(0.0)  # σ_s² around the mean step
    step_var = stats["turn_sq"] / max(2 * (W - 2) * D, 1)  # the same from E‖s_t − s_{t−1}‖² = 2·D·σ_s²
    with torch.no_grad():
        step_f = torch.where(spread > 0, tt / ((W - 1) * D * spread), torch.where(tt > 0, math.inf, 0.0))
        f_total, s_total = ff + fs, fs + ss  # f·(f + s), s·(f + s)
        along1 = torch.where(tt > 0, f_total / tt.sqrt(), torch.zeros_like(tt)) / h1
        along2 = torch.where(tt > 0, s_total / tt.sqrt(), torch.zeros_like(tt)) / h2
        step_persistence = torch.where(along1 > 0, along2 / along1, torch.zeros_like(along1))
        # change = s/h2 − f/h1: its squared norm and its part along the total
        change_sq = ss / (h2 * h2) + ff / (h1 * h1) - 2 * fs / (h1 * h2)
        change_total = s_total / h2 - f_total / h1
        across = (change_sq - torch.where(tt > 0, change_total ** 2 / tt, 0.0)).clamp_min(0.0)
        turn_f = torch.where(step_var > 0, across / (max(D - 1, 1) * step_var * (1 / h1 + 1 / h2)),
                             torch.where(across > 0, math.inf, 0.0))
    return {"drift_f": drift_f, "persistence": persistence, "curvature_f": curvature_f, "residual_noise": noise,
            "step_f": step_f, "step_persistence": step_persistence, "turn_f": turn_f, "noise_correlation": phi}


def _period(ret: torch.Tensor, th: DynamicsThresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_period [n], period [n]) from ret [P − 1, n] (ret[p − 2] = return_error at lag p).

    A lag p returns if ret(p) < orbit_tol, or — an exact period seen through noise, whose returns all sit at the
    noise's own level — ret(p) < quasi_tol and every multiple kp in range (at least one) returns as closely,
    ret(kp) ≤ (1 + period_slack)·ret(p) (a quasi-periodic near-return at p misses by twice as much at 2p). The
    period is then the smallest divisor q of the smallest returning lag with ret(q) ≤ (1 + period_slack)·ret(p):
    the data is equally consistent with q, and noise must not turn a period 5 into a 15."""
    L, n = ret.shape
    lags = list(range(2, L + 2))
    slack = 1 + th.period_slack
    passing = ret < th.orbit_tol
    for i, p in enumerate(lags):
        multiples = [k - 2 for k in lags if k > p and k % p == 0]
        if multiples:
            flat = (ret[multiples] <= slack * ret[i]).all(0)
            passing[i] |= (ret[i] < th.quasi_tol) & flat
    has_period = passing.any(0)
    first = passing.to(torch.int8).argmax(0)  # index of the smallest returning lag
    period = torch.where(has_period, first + 2, torch.zeros_like(first))
    best = ret.gather(0, first[None])[0]
    for q in reversed(lags):  # the smallest consistent divisor wins: visit divisors from large to small
        divides = has_period & (period % q == 0) & (period > q)
        closer = ret[q - 2] <= slack * best
        period = torch.where(divides & closer, torch.full_like(period, q), period)
    return has_period, period


def decide(stats: dict[str, torch.Tensor], th: DynamicsThresholds) -> Labels:
    """Labels from the window statistics of `WindowStats` (concatenated over batches); see the module doc."""
    W, P, R, _ = (int(v) for v in stats["window"])
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
    fit = _drift(stats, W)
    mean_norm = stats["norm_sum"] / W

    def kept(ratio: torch.Tensor) -> torch.Tensor:
        return (ratio >= th.drift_persistence) & (ratio <= 1 / th.drift_persistence)

    line = (fit["drift_f"] >= th.drift_f) & (fit["curvature_f"] < th.drift_f) & kept(fit["persistence"])
    walk = (fit["step_f"] >= th.drift_f) & (fit["turn_f"] < th.drift_f) & kept(fit["step_persistence"])
    net = stats["displacement"] > floor / th.floor_factor * mean_norm  # moved more than the state's rounding u
    trend = (fit["drift_f"] >= th.drift_f) | (fit["step_f"] >= th.drift_f)
    under = stats["rel_max"] <= floor  # no single step the dtype resolves
    at_floor = under & ~(finite & trend & net)  # nor any motion over the window
    growing = (slope - th.z * se > th.rate_margin) & ~at_floor
    decaying = (slope + th.z * se < -th.rate_margin) & ~at_floor

    rms_step = (stats["step_sq"] / m).sqrt()
    if stats["returns"].shape[0]:
        ret = (stats["returns"] / stats["return_count"][:, None].clamp_min(1)).sqrt() / rms_step
        ret = torch.nan_to_num(ret, nan=math.inf)
        has_period, period = _period(ret, th)
        best = torch.where(has_period, ret.gather(0, (period - 2).clamp_min(0)[None])[0], ret.amin(0))
    else:
        has_period = torch.zeros_like(finite)
        period = torch.zeros(finite.shape, dtype=torch.long)
        best = torch.full(finite.shape, math.nan, dtype=torch.float64)
    step_cos = stats["cos_sum"] / stats["cos_count"].clamp_min(1)
    straight = torch.where(stats["step_sum"] > 0, stats["displacement"] / stats["step_sum"],
                           torch.zeros_like(stats["step_sum"]))
    noise = torch.where(mean_norm > 0, rms_step / (math.sqrt(2) * mean_norm), torch.full_like(rms_step, math.inf))

    rough = step_cos < th.smooth_cosine  # the steps are dominated by noise, not by a smooth motion
    drift = finite & ~at_floor & (line | walk)
    hidden = drift & rough  # a drift under noise ∝ the state: its steps grow or shrink with the state's norm
    divergent = ~finite | (growing & ~hidden)
    floored = ~divergent & at_floor
    fixed = ~divergent & ~floored & decaying & ~hidden
    steady = ~divergent & ~floored & ~fixed
    exact_orbit = steady & has_period
    rest = steady & ~exact_orbit
    slider = rest & (((step_cos >= th.slider_cosine) & (straight >= th.slider_straightness)) | drift)
    quasi = rest & ~slider & ((best < th.quasi_tol)
                              | ((step_cos >= th.smooth_cosine) & (straight < th.slider_straightness)))
    noisy_fixed = rest & ~slider & ~quasi & (step_cos <= th.rough_cosine) & (noise <= th.noise_tol)
    fixed = fixed | (noisy_fixed & ~under)
    floored = floored | (noisy_fixed & under)  # noise-like motion in steps under the floor: rounding
    orbit = exact_orbit | quasi
    code = torch.full(finite.shape, UNKNOWN, dtype=torch.long)
    for mask, value in ((slider, SLIDER), (orbit, ORBIT), (fixed, FIXED), (floored, AT_FLOOR), (divergent, DIVERGENT)):
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
        "drift_f": fit["drift_f"],
        "drift_persistence": fit["persistence"],
        "curvature_f": fit["curvature_f"],
        "residual_noise": fit["residual_noise"],
        "step_drift_f": fit["step_f"],
        "step_persistence": fit["step_persistence"],
        "turn_f": fit["turn_f"],
        "noise_correlation": fit["noise_correlation"],
    })


def classify_states(x: torch.Tensor, th: DynamicsThresholds, dtype: torch.dtype | None = None) -> Labels:
    """Classify every token of x [R, n, D] (one layer's states across recurrences) in one go."""
    R, n, _ = x.shape
    stats = WindowStats(R, th, n, th.floor_factor * unit_roundoff(dtype or x.dtype), device=x.device)
    for t in range(R):
        stats.add(t, x[t])
    return decide(stats.state(), th)
