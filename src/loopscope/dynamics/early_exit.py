"""Early exit from the recurrence: when may a looped model stop, and what does stopping cost?

Three rules, each deciding for every position i of a prompt the recurrence after which its next-token prediction
is read (the whole causal prefix 0..i recurs together, as in decoding without a per-token cache; the states of the
prefix do not depend on later tokens, so one run of the whole prompt serves every position):

- **fixed R**: read every position after R recurrences.
- **Huginn's rule** (Geiping et al. 2025, §"zero-shot adaptive compute"): stop at the first recurrence t ≥ 1 with
  KL(p_t ‖ p_{t−1}) = Σ_v p_t,v (log p_t,v − log p_{t−1},v) < 5·10⁻⁴ between successive next-token distributions
  (their mean exit step on MMLU: 11.9–16.2).
- **certified exit** (ours). For a map F that is a contraction with Lipschitz constant ρ < 1 in the Euclidean
  (Frobenius) norm, the fixed point s* = lim s_t satisfies, by the triangle inequality over the remaining steps,

        ‖s_t − s*‖ ≤ Σ_{k≥1} ‖s_{t+k} − s_{t+k−1}‖ ≤ ρ/(1 − ρ) · ‖s_t − s_{t−1}‖          (Banach; tight for F = ρ·x)

  with s the prefix's states (tokens 0..i, all block-output states stacked). The bound is pushed through the exit
  path (coda, final norm, W_U) with σ_t, the norm of the readout's Jacobian at s_t: ‖ℓ_t,i − ℓ*_i‖₂ ≤ σ_t · B_t,i
  to first order. Two stopping tests: the logit-change bound σ_t B_t,i < ε (`certified-logit`), or the decision
  margin m_t,i = ℓ_(1) − ℓ_(2) > √2 σ_t B_t,i (`certified-margin`: then no other token can overtake the argmax,
  since |Δ(ℓ_a − ℓ_v)| ≤ |Δℓ_a| + |Δℓ_v| ≤ √2 ‖Δℓ‖₂), so the answer at t is the limit's answer.

  Assumptions, stated in every table: ρ is either the stability certificate's spectral radius at the long-run
  state (`rate="certificate"`: the prefix's ρ = max_{j ≤ i} ρ(J_jj), exact asymptotically, not a Lipschitz bound
  along the way), the measured step rate (`"measured"`: q_t = max of ‖Δs_k‖/‖Δs_{k−1}‖ over the last `window`
  recurrences, which assumes later steps shrink no slower), or the larger of the two (`"max"`, the default); σ_t is
  a local (first-order) constant estimated by power iteration. Where ρ ≥ 1 (or is unknown) the bound is infinite:
  the rule refuses to certify and the position runs all R_max recurrences.

Everything here is a pure function of an `ExitTrace` (arrays per recurrence and position), so the rules are
tested on linear maps with known ρ; `loopscope.experiments.early_exit` fills the trace from a live model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from loopscope.errors import InputError

HUGINN_KL = 5e-4  # Geiping et al. (2025): exit when KL between successive next-token distributions < 5e-4
RATE_SOURCES = ("certificate", "measured", "max")
MEASURED_WINDOW = 4  # recurrences over which the measured step rate takes its maximum


@dataclass
class ExitTrace:
    """One prompt's run, recurrence by recurrence (t = 0 … R−1 is the state after recurrence t + 1).

    steps [R, T]: ‖s_t,i − s_{t−1},i‖ per token (t = 0 against the initial state); margin [R, T]: top-1 minus
    top-2 logit of the readout at s_t; prediction [R, T] int: its argmax; logp_target [R, T]: log-probability of
    the next token (NaN at the last position, which has none); target [T] int: next token (−1 at the last);
    kl_prev [R, T]: KL(p_t ‖ p_{t−1}) (NaN at t = 0); sigma [R]: readout Jacobian norm at s_t (NaN where not
    computed: no position could be certified there); rho [T]: the certificate's prefix ρ (NaN when not run);
    distance [R, T] (optional): the prefix's ‖s_t − s_{R−1}‖ (Frobenius over tokens 0..i), the last state standing
    in for s*, to check the bound empirically (`bound_violations`)."""

    steps: np.ndarray
    margin: np.ndarray
    prediction: np.ndarray
    logp_target: np.ndarray
    target: np.ndarray
    kl_prev: np.ndarray
    sigma: np.ndarray
    rho: np.ndarray
    distance: np.ndarray | None = None

    @property
    def recurrences(self) -> int:
        return self.steps.shape[0]


def tail_bound(step: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """ρ/(1 − ρ) · ‖s_t − s_{t−1}‖, the bound on ‖s_t − s*‖ of a contraction with rate ρ; +inf where ρ ≥ 1 or ρ is
    NaN (not a contraction, or unknown: nothing is certified)."""
    step, rate = np.asarray(step, float), np.broadcast_to(np.asarray(rate, float), np.shape(step))
    out = np.full(np.shape(step), np.inf)
    ok = np.isfinite(rate) & (rate < 1) & np.isfinite(step)
    out[ok] = rate[ok] / (1 - rate[ok]) * step[ok]
    return out


def prefix_steps(steps: np.ndarray) -> np.ndarray:
    """[R, T] → [R, T]: the step norm of the whole prefix 0..i, sqrt(Σ_{j ≤ i} ‖Δs_j‖²) (Frobenius)."""
    return np.sqrt(np.cumsum(np.square(np.asarray(steps, float)), axis=1))


def measured_rate(steps: np.ndarray, window: int = MEASURED_WINDOW) -> np.ndarray:
    """[R, T] step norms → [R, T]: q_t = max_{t−window < k ≤ t} ‖Δs_k‖ / ‖Δs_{k−1}‖; NaN for t < window (too little
    history to read a rate). Steps of exactly 0 (a reached fixed point) read as rate 0 at 0/0."""
    steps = np.asarray(steps, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = steps[1:] / steps[:-1]
    ratio = np.where((steps[1:] == 0) & (steps[:-1] == 0), 0.0, ratio)
    out = np.full(steps.shape, np.nan)
    for t in range(window, steps.shape[0]):
        out[t] = ratio[t - window: t].max(axis=0)
    return out


def contraction_rate(trace: ExitTrace, source: str = "max", window: int = MEASURED_WINDOW) -> np.ndarray:
    """[R, T]: the rate ρ the certified rule uses for each (recurrence, prefix), by `source` (see module doc)."""
    if source not in RATE_SOURCES:
        raise InputError(f"rate source {source!r}; use one of {RATE_SOURCES}")
    cert = np.broadcast_to(np.asarray(trace.rho, float)[None, :], trace.steps.shape)
    if source == "certificate":
        return cert
    measured = measured_rate(prefix_steps(trace.steps), window)
    if source == "measured":
        return measured
    return np.fmax(cert, measured) if np.isfinite(cert).any() else np.full(cert.shape, np.nan)


def bound_violations(trace: ExitTrace, source: str = "max", window: int = MEASURED_WINDOW,
                     horizon: float = 0.5) -> dict[str, float]:
    """An empirical check of the contraction assumption: over (recurrence t, prefix i) with a finite bound and t in
    the first `horizon` of the run (so that s_{R−1} is much closer to s* than s_t is), the share where the measured
    ‖s_t − s_{R−1}‖ exceeds ρ/(1 − ρ)·‖s_t − s_{t−1}‖. {"checked": count, "violated": share (NaN if none)}."""
    if trace.distance is None:
        raise InputError("this trace has no distances to its last state; build it with them")
    bound = tail_bound(prefix_steps(trace.steps), contraction_rate(trace, source, window))
    t_max = max(1, int(trace.recurrences * horizon))
    finite = np.isfinite(bound[:t_max])
    n = int(finite.sum())
    bad = int((trace.distance[:t_max][finite] > bound[:t_max][finite]).sum())
    return {"checked": n, "violated": bad / n if n else float("nan")}


def first_exit(stop: np.ndarray) -> np.ndarray:
    """[R, T] bool → [T] int: the first recurrence index t where `stop` holds, R − 1 (run everything) where never."""
    stop = np.asarray(stop, bool)
    return np.where(stop.any(axis=0), stop.argmax(axis=0), stop.shape[0] - 1)


def certified_stops(trace: ExitTrace, test: str, eps: float | None = None, source: str = "max",
                    window: int = MEASURED_WINDOW) -> np.ndarray:
    """[R, T] bool: where the certified rule may stop. test "logit": σ_t B_t,i < ε; "margin": √2 σ_t B_t,i < m_t,i.
    B_t,i = ρ/(1−ρ) · prefix step (`tail_bound`); infinite (never stops) where ρ ≥ 1 or σ is unknown."""
    bound = tail_bound(prefix_steps(trace.steps), contraction_rate(trace, source, window))
    sigma = np.asarray(trace.sigma, float)[:, None]
    with np.errstate(invalid="ignore"):
        logit_bound = np.where(np.isfinite(sigma) & np.isfinite(bound), sigma * bound, np.inf)
    if test == "logit":
        if eps is None or not eps > 0:
            raise InputError(f"certified-logit needs ε > 0; got {eps}")
        return logit_bound < eps
    if test == "margin":
        return np.sqrt(2) * logit_bound < trace.margin
    raise InputError(f"certified test {test!r}; use 'logit' or 'margin'")


def huginn_stops(trace: ExitTrace, threshold: float = HUGINN_KL) -> np.ndarray:
    """[R, T] bool: KL(p_t ‖ p_{t−1}) < threshold (never at t = 0, which has no previous distribution)."""
    kl = np.asarray(trace.kl_prev, float)
    return np.nan_to_num(kl, nan=np.inf) < threshold


def fixed_stops(trace: ExitTrace, recurrences: int) -> np.ndarray:
    """[R, T] bool: stop after exactly `recurrences` recurrences (index recurrences − 1)."""
    if not 1 <= recurrences <= trace.recurrences:
        raise InputError(f"fixed R = {recurrences} is outside the run's 1..{trace.recurrences} recurrences")
    stop = np.zeros(trace.steps.shape, bool)
    stop[recurrences - 1] = True
    return stop


def exit_outcome(trace: ExitTrace, stop: np.ndarray) -> pd.DataFrame:
    """One row per position with a next token: token, exit (recurrences run = t + 1), stopped_early (the rule
    fired before the last recurrence), loss (−log p of the next token at the exit), correct (argmax = next token),
    agrees (argmax at the exit = argmax after all R recurrences)."""
    exit_t = first_exit(stop)
    fired = np.asarray(stop, bool).any(axis=0)
    pos = np.arange(trace.steps.shape[1])
    keep = np.asarray(trace.target) >= 0
    pred = trace.prediction[exit_t, pos]
    return pd.DataFrame({
        "token": pos[keep], "recurrences_run": (exit_t + 1)[keep],
        "stopped_early": (fired & (exit_t < len(stop) - 1))[keep],
        "loss": -trace.logp_target[exit_t, pos][keep], "correct": (pred == trace.target)[keep],
        "agrees": (pred == trace.prediction[-1])[keep],
    })


def rule_outcomes(trace: ExitTrace, fixed: list[int], eps: list[float], huginn: list[float] = (HUGINN_KL,),
                  sources: tuple[str, ...] = ("max",)) -> pd.DataFrame:
    """exit_outcome of every rule on one trace, with columns rule, parameter prepended. Certified rules are named
    by their test and rate source, e.g. "certified margin (max ρ)"."""
    rows = []
    for r in fixed:
        rows.append(exit_outcome(trace, fixed_stops(trace, r)).assign(rule="fixed R", parameter=float(r)))
    for th in huginn:
        rows.append(exit_outcome(trace, huginn_stops(trace, th)).assign(rule="Huginn KL", parameter=th))
    for source in sources:
        rows.append(exit_outcome(trace, certified_stops(trace, "margin", source=source))
                    .assign(rule=f"certified margin ({source} ρ)", parameter=np.nan))
        for e in eps:
            rows.append(exit_outcome(trace, certified_stops(trace, "logit", e, source=source))
                        .assign(rule=f"certified logit ({source} ρ)", parameter=e))
    out = pd.concat(rows, ignore_index=True)
    return out[["rule", "parameter", *[c for c in out.columns if c not in ("rule", "parameter")]]]


def exit_summary(outcomes: pd.DataFrame, max_recurrences: int) -> pd.DataFrame:
    """Compute against quality per (model, rule, parameter) from `rule_outcomes` rows (with `model`, `batch`).

    recurrences_mean (mean recurrences run per position), saved (1 − recurrences_mean / R_max), loss_mean (nats),
    accuracy (top-1 = next token), agreement (argmax = the R_max argmax), loss_change and accuracy_change against
    the R_max run of the same model, stopped_early (share of positions the rule stopped before R_max), changed_early
    (positions stopped early whose answer differs from R_max's: 0 is what a certificate promises), n (positions)."""
    keys = ["model", "rule", "parameter"]
    g = outcomes.assign(changed=outcomes.stopped_early & ~outcomes.agrees).groupby(keys, dropna=False, sort=False)
    table = g.agg(recurrences_mean=("recurrences_run", "mean"), loss_mean=("loss", "mean"),
                  accuracy=("correct", "mean"), agreement=("agrees", "mean"),
                  stopped_early=("stopped_early", "mean"), changed_early=("changed", "sum"),
                  n=("loss", "size")).reset_index()
    table["saved"] = 1 - table["recurrences_mean"] / max_recurrences
    full = table[(table.rule == "fixed R") & (table.parameter == max_recurrences)].set_index("model")
    if len(full):
        table["loss_change"] = table["loss_mean"] - table["model"].map(full["loss_mean"])
        table["accuracy_change"] = table["accuracy"] - table["model"].map(full["accuracy"])
    return table
