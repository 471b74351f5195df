"""Per-token behaviour of a block layer across recurrences: fixed point, orbit, slider, divergent or unknown
(Geiping et al. 2025 §7, Fig. 12; Blayney et al. 2026 §3.4, App. C, Fig. 13).

Two classifiers share one output format:
    method="dynamics" (default): `rule_dynamics` — divergence, fixed point, period search, drift; thresholds
                                 in `DynamicsThresholds`.
    method="paper":              `rule_paper` — reconstruction of Blayney et al. App. C (τ = 0.05, ρ = 0.9) on
                                 the cosine to the last recurrence; thresholds in `PaperThresholds`.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics import rule_dynamics, rule_paper
from loopscope.dynamics._tokens import RealTokens, real_tokens, resolve_layer, token_chunks, token_strings
from loopscope.dynamics.rule_dynamics import BEHAVIOURS, Labels
from loopscope.errors import InputError

# method -> (its thresholds dataclass, its per-token rule)
RULES = {"dynamics": (rule_dynamics.DynamicsThresholds, rule_dynamics.classify_states),
         "paper": (rule_paper.PaperThresholds, rule_paper.classify_states)}
METHODS = tuple(RULES)


def layer_labels(traj: Trajectory, layer: int, method: str = "dynamics", tokens: RealTokens | None = None,
                 **thresholds: object) -> Labels:
    """Labels [N] of every real token at block layer `layer` (chunked over tokens)."""
    if method not in RULES:
        raise InputError(f"method={method!r}; choose one of {METHODS}")
    settings, rule = RULES[method]
    valid = {f.name for f in fields(settings)}
    unknown = sorted(set(thresholds) - valid)
    if unknown:
        raise InputError(f"unknown thresholds {unknown} for method={method!r}; valid: {sorted(valid)}")
    th = settings(**thresholds)
    j = resolve_layer(traj, layer)
    tokens = real_tokens(traj) if tokens is None else tokens
    parts = [rule(x[:, 0], th) for _, x in token_chunks(traj, tokens, layers=slice(j, j + 1))]
    return Labels(
        code=torch.cat([p.code for p in parts]),
        period=torch.cat([p.period for p in parts]),
        diagnostics={k: torch.cat([p.diagnostics[k] for p in parts]) for k in parts[0].diagnostics},
    )


def classify(traj: Trajectory, layer: int = -1, method: str = "dynamics", **thresholds: object) -> pd.DataFrame:
    """Behaviour of every real token's state at block layer `layer` across recurrences t = 0..R-1.

    One row per real (batch, token): [batch, token, token_str, layer, behaviour, period, *diagnostics].
    behaviour ∈ {fixed_point, orbit, slider, divergent, unknown}; `layer` is the resolved index (-1 → K-1).
    period: nullable Int64 — the orbit's period in recurrences for orbits (method="dynamics"), <NA> for every
    other behaviour and for every token under method="paper" (the heuristic defines no period).

    Diagnostics, method="dynamics" (see `rule_dynamics` for formulas): final_norm, final_relative_step,
    tail_relative_step, growth, return_error (at the reported period for orbits, else the smallest over the
    searched periods), step_cosine, straightness, step_ratio.
    Diagnostics, method="paper" (see `rule_paper`): fixed_fraction, n_peaks, n_returns, monotone_fraction,
    min_cosine.

    Thresholds are keyword arguments: method="dynamics" takes window, runaway_factor, fixed_tol, settle,
    orbit_tol, max_period, slider_cosine, slider_straightness, slider_step_ratio (defaults in
    `rule_dynamics.DynamicsThresholds`); method="paper" takes tau, rho, window_start (`rule_paper.PaperThresholds`).
    """
    tokens = real_tokens(traj)
    labels = layer_labels(traj, layer, method, tokens, **thresholds)
    period = pd.array(labels.period.numpy(), dtype="Int64")
    period[labels.period.numpy() == 0] = pd.NA
    frame = pd.DataFrame({
        "batch": tokens.batch.numpy(),
        "token": tokens.token.numpy(),
        "token_str": token_strings(traj, tokens),
        "layer": resolve_layer(traj, layer),
        "behaviour": np.asarray(BEHAVIOURS, dtype=object)[labels.code.numpy()],
        "period": period,
    })
    for name, values in labels.diagnostics.items():
        frame[name] = values.numpy()
    return frame
