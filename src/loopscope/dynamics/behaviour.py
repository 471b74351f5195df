"""Per-token behaviour of a block layer across recurrences: fixed point, orbit, slider, divergent or unknown
(Geiping et al. 2025 §7, Fig. 12; Blayney et al. 2026 §3.4, App. C, Fig. 13).

Two detectors share one output format and are shown side by side:
    method="dynamics" (default): `rule_dynamics` — the step-size trend, return structure and drift of the tail
                                 window; thresholds in `DynamicsThresholds`.
    method="paper":              `rule_paper` — reconstruction of Blayney et al. App. C (τ = 0.05, ρ = 0.9) on
                                 the cosine to the last recurrence; thresholds in `PaperThresholds`. Its blind
                                 spot, inherent to the method: a cosine cannot see radial growth or a drift away
                                 from the origin (cos → 1), so exponential growth and sliders read as fixed points.

`Behaviour` is the accumulator: per batch it keeps, for each block layer asked for, the dynamics detector's window
statistics and the paper heuristic's cosines to the final state (one scalar per token and recurrence of the
window); `BehaviourStats` is what it combines to, and everything else (labels at any thresholds, co-occurrence,
threshold sweeps) is computed from that without the states.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics import rule_dynamics, rule_paper
from loopscope.dynamics._tokens import batch_tokens, cosine, resolve_layer
from loopscope.dynamics.precision import unit_roundoff
from loopscope.dynamics.rule_dynamics import BEHAVIOURS, Labels, WindowStats
from loopscope.errors import InputError
from loopscope.labels import Step

RULES = {"dynamics": rule_dynamics.DynamicsThresholds, "paper": rule_paper.PaperThresholds}
METHODS = tuple(RULES)
COLLECTION = {"dynamics": ("window", "max_period", "floor_factor"), "paper": ("window_start",)}


def thresholds_for(method: str, thresholds: dict) -> object:
    if method not in RULES:
        raise InputError(f"method={method!r}; choose one of {METHODS}")
    settings = RULES[method]
    valid = {f.name for f in fields(settings)}
    unknown = sorted(set(thresholds) - valid)
    if unknown:
        raise InputError(f"unknown thresholds {unknown} for method={method!r}; valid: {sorted(valid)}")
    return settings(**thresholds)


class Behaviour(Accumulator):
    """Per-token statistics of the block layers `layers` (None = all) for the detectors in `methods`."""

    name = "behaviour"
    sites = frozenset({"resid_post"})

    def __init__(self, layers: list[int] | None = None, methods: tuple[str, ...] = METHODS,
                 dynamics: rule_dynamics.DynamicsThresholds | None = None,
                 paper: rule_paper.PaperThresholds | None = None, paper_layers: tuple[int, ...] | None = (-1,)) -> None:
        """`layers`: block layers the detectors read (None: all); the paper heuristic reads only `paper_layers` of
        them (default the last, as App. C does; None: all), because it keeps R/2 cosines per token and layer."""
        self.layers, self.methods, self.paper_layers = layers, tuple(methods), paper_layers
        self.dynamics = dynamics or rule_dynamics.DynamicsThresholds()
        self.paper = paper or rule_paper.PaperThresholds()
        self.needs_finals = "paper" in self.methods

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        K = ctx.block_size
        self.which = list(range(K)) if self.layers is None else sorted({layer % K for layer in self.layers})
        self.b, self.t = ctx.real
        n = self.b.numel()
        floor = self.dynamics.floor_factor * unit_roundoff(ctx.state_dtype)
        R = ctx.recurrences
        keep = torch.float64 if ctx.state_dtype == torch.float64 else torch.float32
        self.stats = {j: WindowStats(R, self.dynamics, n, floor, keep, ctx.device) for j in self.which} \
            if "dynamics" in self.methods else {}
        if "paper" in self.methods:
            self.p_start, self.p_stop = rule_paper.window_bounds(R, self.paper)
            star = ctx.finals.core_last
            chosen = self.which if self.paper_layers is None else sorted({layer % K for layer in self.paper_layers})
            self.paper_which = [j for j in chosen if j in self.which]
            self.star = {j: batch_tokens(star[j], self.b, self.t, torch.float64) for j in self.paper_which}
            self.cosines = {j: torch.full((self.p_stop - self.p_start, n), float("nan"), dtype=torch.float64,
                                          device=ctx.device) for j in self.paper_which}
            self.finite = {j: torch.ones(n, dtype=torch.bool, device=ctx.device) for j in self.paper_which}

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core" or step.layer not in self.which:
            return
        j, t = step.layer, step.recurrence
        xs = self.ctx.real_states(x)  # float64: norms of large states overflow in float32
        if j in self.stats:
            self.stats[j].add(t, xs)
        if "paper" in self.methods and j in self.star:
            self.finite[j] &= torch.isfinite(xs.sum(-1))
            if self.p_start <= t < self.p_stop:
                self.cosines[j][t - self.p_start] = cosine(xs, self.star[j]).double()

    def end(self) -> Part:
        ctx = self.ctx
        strings = None
        if ctx.tokens is not None:
            strings = [ctx.tokens[b][t] if t < len(ctx.tokens[b]) else f"pos{t}"
                       for b, t in zip(self.b.tolist(), self.t.tolist())]
        elif ctx.token_ids is not None:
            strings = [str(int(ctx.token_ids[b, t])) for b, t in zip(self.b.tolist(), self.t.tolist())]
        part: Part = {"batch": self.b + ctx.first_prompt, "token": self.t, "K": ctx.block_size,
                      "R": ctx.recurrences, "state_dtype": str(ctx.state_dtype).removeprefix("torch."),
                      "token_str": strings if strings is not None else [f"pos{t}" for t in self.t.tolist()],
                      "layers": {}}
        for j in self.which:
            entry: Part = {}
            if j in self.stats:
                entry["dynamics"] = self.stats[j].state()
            if "paper" in self.methods and j in self.star:
                entry["paper"] = {"cosines": self.cosines[j], "finite": self.finite[j]}
            part["layers"][str(j)] = entry
        return part

    def combine(self, parts: list[Part]) -> BehaviourStats:
        layers: dict[int, dict] = {}
        for j in parts[0]["layers"]:
            entry = {}
            first = parts[0]["layers"][j]
            if not first:
                continue
            if "dynamics" in first:
                merged = {}
                for k, v in first["dynamics"].items():
                    if k in ("steps", "window", "floor"):
                        merged[k] = v
                    elif k in ("returns",):
                        merged[k] = torch.cat([p["layers"][j]["dynamics"][k] for p in parts], dim=-1)
                    elif k == "return_count":
                        merged[k] = v
                    else:
                        merged[k] = torch.cat([p["layers"][j]["dynamics"][k] for p in parts])
                entry["dynamics"] = merged
            if "paper" in first:
                entry["paper"] = {"cosines": torch.cat([p["layers"][j]["paper"]["cosines"] for p in parts], dim=-1),
                                  "finite": torch.cat([p["layers"][j]["paper"]["finite"] for p in parts])}
            layers[int(j)] = entry
        return BehaviourStats(
            batch=torch.cat([p["batch"] for p in parts]), token=torch.cat([p["token"] for p in parts]),
            token_str=[s for p in parts for s in p["token_str"]], block_size=int(parts[0]["K"]), layers=layers,
            dynamics=self.dynamics, paper=self.paper, recurrences=int(parts[0]["R"]),
            state_dtype=str(parts[0]["state_dtype"]),
        )


@dataclass
class BehaviourStats:
    """What `Behaviour` combines to: token ids and, per block layer, each detector's per-token statistics."""

    batch: torch.Tensor
    token: torch.Tensor
    token_str: list[str]
    block_size: int
    layers: dict[int, dict]
    dynamics: rule_dynamics.DynamicsThresholds
    paper: rule_paper.PaperThresholds
    recurrences: int  # R: the horizon every label is read at
    state_dtype: str  # the dtype the states were computed in (its rounding sets the floor)

    def measurement(self, layer: int, method: str) -> dict[str, object]:
        """What a label is a measurement of, one column each in every behaviour table: estimator (the detector and
        its window), state_precision, floor (the relative step below which rounding, not the dynamics, moves a
        state: floor_factor · u(state dtype), `precision`), recurrences (the horizon R), window (the tail it
        reads), readout (the state space: the residual stream after block layer `layer`)."""
        R = self.recurrences
        if method == "dynamics":
            window = self.dynamics.window_for(R)
            estimator = "dynamics detector: step-size trend, returns, drift test (rule_dynamics)"
        else:
            start, stop = rule_paper.window_bounds(R, self.paper)
            window = stop - start
            estimator = "paper heuristic: cosine to the last state, tau/rho (rule_paper, Blayney et al. App. C)"
        return {"estimator": estimator, "state_precision": self.state_dtype,
                "floor": self.dynamics.floor_factor * unit_roundoff(self.state_dtype), "recurrences": R,
                "window": window, "readout": f"resid_post of block layer {layer % self.block_size}"}

    def labels(self, layer: int, method: str = "dynamics", **thresholds: object) -> Labels:
        """Labels of block layer `layer` under `method`, with `thresholds` overriding the deciding thresholds."""
        j = layer % self.block_size
        entry = self.layers.get(j, {})
        if method not in entry:
            raise InputError(f"layer {j} was not collected for method={method!r}; collect it with "
                             f"Behaviour(layers=[{j}], methods=('{method}',))")
        base = self.dynamics if method == "dynamics" else self.paper
        changed = sorted(k for k in thresholds if k in COLLECTION[method] and thresholds[k] != getattr(base, k))
        if changed:
            raise InputError(f"thresholds {changed} decide what is collected; rerun the capture with them")
        th = thresholds_for(method, {**{f.name: getattr(base, f.name) for f in fields(base)}, **thresholds})
        if method == "dynamics":
            return rule_dynamics.decide(entry["dynamics"], th)
        return rule_paper.decide_window(entry["paper"]["cosines"], th, entry["paper"]["finite"])

    def frame(self, layer: int = -1, method: str = "dynamics", **thresholds: object) -> pd.DataFrame:
        """One row per real token: [batch, token, token_str, layer, behaviour, period, *diagnostics,
        *measurement]."""
        labels = self.labels(layer, method, **thresholds)
        period = pd.array(labels.period.numpy(), dtype="Int64")
        period[labels.period.numpy() == 0] = pd.NA
        out = pd.DataFrame({
            "batch": self.batch.numpy(), "token": self.token.numpy(), "token_str": self.token_str,
            "layer": layer % self.block_size,
            "behaviour": np.asarray(BEHAVIOURS, dtype=object)[labels.code.numpy()], "period": period,
        })
        for name, values in labels.diagnostics.items():
            out[name] = values.numpy()
        for name, value in self.measurement(layer, method).items():
            out[name] = value
        return out


def collect(traj: Trajectory, layers: list[int] | None, methods: tuple[str, ...], **thresholds: object
            ) -> BehaviourStats:
    """Run `Behaviour` over an in-memory Trajectory (collection thresholds taken from `thresholds`)."""
    dyn = {k: v for k, v in thresholds.items() if k in {f.name for f in fields(rule_dynamics.DynamicsThresholds)}}
    pap = {k: v for k, v in thresholds.items() if k in {f.name for f in fields(rule_paper.PaperThresholds)}}
    acc = Behaviour(layers, methods, rule_dynamics.DynamicsThresholds(**dyn) if "dynamics" in methods else None,
                    rule_paper.PaperThresholds(**pap) if "paper" in methods else None, paper_layers=None)
    return run_on_trajectory(acc, traj)


def layer_labels(traj: Trajectory, layer: int, method: str = "dynamics", **thresholds: object) -> Labels:
    """Labels [N] of every real token at block layer `layer`."""
    thresholds_for(method, thresholds)
    j = resolve_layer(traj, layer)
    return collect(traj, [j], (method,), **thresholds).labels(j, method, **thresholds)


def classify(traj: Trajectory, layer: int = -1, method: str = "dynamics", **thresholds: object) -> pd.DataFrame:
    """Behaviour of every real token's state at block layer `layer` across recurrences t = 0..R-1.

    One row per real (batch, token): [batch, token, token_str, layer, behaviour, period, *diagnostics,
    *measurement]. behaviour ∈ {fixed_point, orbit, slider, divergent, unknown, at_floor} (at_floor: no motion the
    state's precision resolves — a fixed point as far as it can tell, method="dynamics" only); `layer` is the
    resolved index (-1 → K-1). The measurement columns name what the label was read from, so that two fixed-point
    statements can be compared: estimator, state_precision, floor, recurrences (the horizon R), window, readout
    (`BehaviourStats.measurement`).
    period: nullable Int64 — the orbit's period in recurrences for exactly periodic orbits (method="dynamics"),
    <NA> for quasi-periodic orbits, every other behaviour and every token under method="paper".

    Diagnostics, method="dynamics" (formulas in `rule_dynamics`): final_norm, final_relative_step, step_rate
    (per-recurrence factor of the step size), step_rate_se, at_floor, noise_level, return_error, step_cosine,
    straightness, growth, drift_f, drift_persistence, curvature_f, residual_noise, step_drift_f, step_persistence,
    turn_f. Diagnostics, method="paper" (`rule_paper`): fixed_fraction, n_peaks, n_returns,
    monotone_fraction, min_cosine.

    Thresholds are keyword arguments: method="dynamics" takes the fields of `rule_dynamics.DynamicsThresholds`,
    method="paper" those of `rule_paper.PaperThresholds` (tau, rho, window_start).
    """
    thresholds_for(method, thresholds)
    j = resolve_layer(traj, layer)
    return collect(traj, [j], (method,), **thresholds).frame(j, method, **thresholds)


def behaviour_counts(labels: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Tokens per behaviour for each detector: `labels` maps a detector's name to its per-token table (column
    `behaviour`); one row per behaviour that occurs (in BEHAVIOURS order, index name `behaviour`), one integer column
    per detector."""
    counts = pd.DataFrame({name: frame["behaviour"].value_counts() for name, frame in labels.items()})
    counts = counts.reindex([b for b in BEHAVIOURS if b in counts.index]).fillna(0).astype(int)
    counts.index.name = "behaviour"
    return counts
