"""Blayney et al. (2026) App. C heuristic behaviour detector — a RECONSTRUCTION (`classify(method="paper")`).

The paper's Algorithm 1 is not available (reference §3.4: "pseudo-code [missing]"). What is known: the input per
token is the sequence of cosine similarities between the (final recurrent) layer's output after each recurrence
and the output after the last recurrence,

    c_t = cos(X_{j,t}, X_{j,R-1}),  t = 0..R-1      (so c_{R-1} = 1 by construction),

the hyperparameters are τ = 0.05 and ρ = 0.9, and the classes are fixed point / orbit / slider / unknown. This
module implements the reference's stated reading ("fixed point if at least ρ of the (later) recurrences have
1 − cos ≤ τ; otherwise orbit if the cosine oscillates and returns; slider if it drifts monotonically; unknown
otherwise"). Interpretations we had to make, each a choice of ours, not the paper's:

1. "(later) recurrences" = the window t ∈ [⌊window_start·R⌋, R−2], window_start = 0.5 (the second half).
   The last recurrence is excluded because c_{R-1} = 1 always. window_start=0 uses every recurrence.
2. fixed point: fixed_fraction = fraction of window recurrences with 1 − c_t ≤ τ; fixed if ≥ ρ.
3. "oscillates": the window's cosine sequence has at least 2 strict local maxima (Δc changes sign from + to −).
   "returns": the sequence re-enters the band 1 − c ≤ τ from outside at least once inside the window (the
   trajectory comes back near the final state before the end). orbit = oscillates and returns.
4. "drifts monotonically": at least ρ of the window's successive differences Δc have the same sign (either
   sign; ρ reused as the monotonicity fraction). Checked after the orbit test.
5. Non-finite states (not covered by the paper) are labelled "divergent", as in the dynamics classifier.
6. The period of an orbit is not defined by the heuristic: period is <NA> for every token.

Consequences to keep in mind: an orbit or drift small enough that 1 − c ≤ τ throughout is a "fixed point"
(τ = 0.05 allows an angle of ≈ 18° to the final state), and a slow convergence that stays outside the band
with monotonically rising cosine is a "slider" — both are properties of the heuristic the paper warns about
(rates depend strongly on τ and ρ, chosen by eye).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopscope.dynamics._tokens import cosine
from loopscope.dynamics.rule_dynamics import DIVERGENT, FIXED, ORBIT, SLIDER, UNKNOWN, Labels
from loopscope.errors import InputError

MIN_PEAKS = 2  # local maxima needed to call the cosine sequence oscillating
MIN_RETURNS = 1  # re-entries into the τ-band needed to say the trajectory returns


@dataclass(frozen=True)
class PaperThresholds:
    """Hyperparameters of the App. C heuristic (keyword arguments of `classify(method="paper")`)."""

    tau: float = 0.05  # band: 1 − cos ≤ τ counts as "at the final state" (App. C.1)
    rho: float = 0.9  # fraction of window recurrences in the band for a fixed point (App. C.1)
    window_start: float = 0.5  # the "(later)" recurrences start at ⌊window_start·R⌋ (our reading)


def cosine_to_final(x: torch.Tensor) -> torch.Tensor:
    """c [R, n] with c_t = cos(x_t, x_{R-1}) for states x [R, n, D]."""
    return cosine(x, x[-1:])


def window_bounds(R: int, th: PaperThresholds) -> tuple[int, int]:
    """[start, R−1): the recurrences the heuristic reads (the last one is excluded: its cosine is 1)."""
    start = int(th.window_start * R)
    if not 0 <= th.window_start < 1 or R - 1 - start < 3:
        raise InputError(f"window_start={th.window_start} with R={R} leaves fewer than 3 recurrences to read; "
                         "capture more recurrences or lower window_start")
    return start, R - 1


def classify_cosines(c: torch.Tensor, th: PaperThresholds, finite: torch.Tensor | None = None) -> Labels:
    """Classify cosine sequences c [R, n] (c_{R-1} = 1); `finite` [n] False marks divergent tokens."""
    start, stop = window_bounds(c.shape[0], th)
    return decide_window(c[start:stop], th, finite)


def decide_window(w: torch.Tensor, th: PaperThresholds, finite: torch.Tensor | None = None) -> Labels:
    """Classify the window's cosines w [L, n] (see the module doc)."""
    n = w.shape[1]
    in_band = (1 - w) <= th.tau
    fixed_fraction = in_band.double().mean(0)
    dc = w[1:] - w[:-1]
    peaks = ((dc[:-1] > 0) & (dc[1:] < 0)).sum(0)
    reentries = (~in_band[:-1] & in_band[1:]).sum(0)
    monotone = torch.maximum((dc > 0).double().mean(0), (dc < 0).double().mean(0))
    valid = torch.isfinite(w).all(0)  # a zero state has no cosine: such a token stays "unknown"
    finite = valid if finite is None else finite

    fixed = finite & valid & (fixed_fraction >= th.rho)
    orbit = finite & valid & ~fixed & (peaks >= MIN_PEAKS) & (reentries >= MIN_RETURNS)
    slider = finite & valid & ~fixed & ~orbit & (monotone >= th.rho)
    code = torch.full((n,), UNKNOWN, dtype=torch.long)
    for mask, value in ((slider, SLIDER), (orbit, ORBIT), (fixed, FIXED), (~finite, DIVERGENT)):
        code = torch.where(mask, torch.full_like(code, value), code)
    return Labels(code=code, period=torch.zeros(n, dtype=torch.long), diagnostics={
        "fixed_fraction": fixed_fraction,
        "n_peaks": peaks,
        "n_returns": reentries,
        "monotone_fraction": monotone,
        "min_cosine": w.amin(0),
    })


def classify_states(x: torch.Tensor, th: PaperThresholds) -> Labels:
    """The App. C heuristic on one layer's states x [R, n, D]."""
    finite = torch.isfinite(x).all(-1).all(0)
    return classify_cosines(cosine_to_final(x), th, finite)
