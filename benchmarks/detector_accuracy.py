"""Accuracy of both per-token behaviour detectors on systems whose long-run behaviour is known exactly, per class,
per observation regime and per R (not a test: it prints a table).

Each class draws N random systems (D = 32) with parameters spread over a range, a random transient of 0–R/4 steps
before the asymptotic regime, and a random overall scale 10^U(−3, 4):

    fixed_point  x* + ρ^t (x_0 − x*) + noise, ρ ~ U(0.3, 0.9), noise ~ U(0, 5 %) of ‖x*‖
    slider       x_0 + t·v + noisy steps (U(0, 2)·‖v‖: per-step noise up to twice the step), ‖v‖ ~ U(0.02, 1)
                 of ‖x_0‖
    orbit        rotation of exact period p ~ {2, …, 13} in a random plane around a random centre, or a
                 quasi-periodic rotation (irrational period in (2.5, 30)), optional 0–1 % noise
    divergent    geometric growth by λ ~ U(1.02, 1.5)

seen in three regimes:

    clean        as above, states in float32
    state_noise  every state plus observation noise of U(0.2 %, 1 %) of its own norm (a bfloat16 state's rounding
                 is ≈ 0.2–0.4 %); the slider is then a slow slide, x_0 + t·v with ‖v‖ such that a 32-step tail
                 moves U(10, 20)× the noise (the per-step noise is larger than the step), float32
    bf16         the clean systems (the slider a slow slide of U(0.2 %, 1 %) of ‖x_0‖ per step) rounded state by
                 state to bfloat16 and classified as a bfloat16 run (its rounding floor, 16·2⁻⁸ ≈ 6 % per step):
                 a token that never moves past it is `at_floor`, which counts as wrong here and is shown apart
    carried_noise as clean, but the fixed point is a contraction that carries each step's perturbation into the
                 next, x_{t+1} = x* + ρ(x_t − x*) + η_t (ρ ~ U(0.3, 0.9), ‖η‖ up to 1 % of ‖x*‖): noise correlated
                 from step to step (AR(1), φ = ρ), as a looped model's rounding is — not the i.i.d. noise above

"exact periods": the share of exactly periodic orbits (period ≤ min(16, W // 2), the longest searched at R) labelled
orbit with exactly their period (dynamics detector).

    python benchmarks/detector_accuracy.py [--n 40]
"""

from __future__ import annotations

import argparse
import math
import time

import pandas as pd
import torch

from loopscope.capture import Trajectory
from loopscope.dynamics import classify
from loopscope.dynamics.synthetic import add_state_noise, round_to

D = 32
RS = (32, 64, 128, 256)
KINDS = ("fixed_point", "slider", "orbit", "divergent")
REGIMES = ("clean", "state_noise", "bf16", "carried_noise")


def rand(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def unit(g):
    v = torch.randn(D, generator=g, dtype=torch.float64)
    return v / v.norm()


def system(kind: str, R: int, seed: int, regime: str = "clean") -> tuple[torch.Tensor, int]:
    """(x [R, D] float64, exact period or 0) of one random system of class `kind` seen in `regime`."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(R, dtype=torch.float64)[:, None]
    period = 0
    noise = rand(g, 0.002, 0.01) if regime == "state_noise" else 0.0
    if kind == "fixed_point" and regime == "carried_noise":  # x_{t+1} = x* + ρ(x_t − x*) + η_t: AR(1) noise, φ = ρ
        star = unit(g) * math.sqrt(D) * rand(g, 1, 5)
        rho, size = rand(g, 0.3, 0.9), rand(g, 0, 0.01) * star.norm() / math.sqrt(D)
        x, states = torch.randn(D, generator=g, dtype=torch.float64) * math.sqrt(D), []
        for _ in range(R):
            x = star + rho * (x - star) + torch.randn(D, generator=g, dtype=torch.float64) * size
            states.append(x)
        x = torch.stack(states)
    elif kind == "fixed_point":
        star = unit(g) * math.sqrt(D) * rand(g, 1, 5)
        x0 = torch.randn(D, generator=g, dtype=torch.float64) * math.sqrt(D)
        size = rand(g, 0, 0.05) * star.norm() / math.sqrt(D)
        x = star + rand(g, 0.3, 0.9) ** t * (x0 - star) + torch.randn(R, D, generator=g, dtype=torch.float64) * size
    elif kind == "slider" and regime != "clean":
        x0 = torch.randn(D, generator=g, dtype=torch.float64)
        speed = rand(g, 10, 20) * noise / 32 if regime == "state_noise" else rand(g, 0.002, 0.01)
        x = x0 + t * unit(g) * x0.norm() * speed  # a slow slide: per step a fraction `speed` of ‖x_0‖
    elif kind == "slider":
        x0 = torch.randn(D, generator=g, dtype=torch.float64)
        v = unit(g) * x0.norm() * rand(g, 0.02, 1.0)
        steps = v + torch.randn(R, D, generator=g, dtype=torch.float64) * rand(g, 0, 2.0) * v.norm() / math.sqrt(D)
        x = x0 + torch.cumsum(steps, 0)
    elif kind == "orbit":
        q = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))[0]
        exact = rand(g, 0, 1) < 0.6
        turn = float(torch.randint(2, 14, (), generator=g)) if exact else rand(g, 2.5, 30)
        angle = 2 * math.pi * t / turn + rand(g, 0, 6.3)
        radius, offset = rand(g, 0.2, 2), rand(g, 0, 3)
        x = offset * q[:, 2] + radius * (angle.cos() * q[:, 0] + angle.sin() * q[:, 1])
        x = x + torch.randn(R, D, generator=g, dtype=torch.float64) * rand(g, 0, 0.01) * radius / math.sqrt(D)
        period = int(turn) if exact else 0
    elif kind == "divergent":
        x = rand(g, 1.02, 1.5) ** t * torch.randn(D, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    length = int(rand(g, 0, R / 4))
    if length > 1:  # a random-walk transient that ends where the behaviour starts
        walk = torch.cumsum(torch.randn(length, D, generator=g, dtype=torch.float64) * 0.3 * x[length].norm()
                            / math.sqrt(D), 0)
        x = torch.cat([walk - walk[-1] + x[length], x[length:]])
    x = add_state_noise(x, noise, seed) * 10 ** rand(g, -3, 4)
    if regime == "bf16" and kind == "divergent":  # keep it inside bfloat16's range (3.4e38) for the whole run
        x = x / x[-1].abs().max() * 1e30 if not torch.isfinite(x[-1]).all() or x[-1].abs().max() > 1e30 else x
    return (round_to(x) if regime == "bf16" else x), period


def accuracy(n: int, rs: tuple[int, ...] = RS, regimes: tuple[str, ...] = REGIMES) -> pd.DataFrame:
    """One row per (R, regime, method, system): truth, label, correct, period (exact, or 0), period_ok."""
    rows = []
    for R in rs:
        for regime in regimes:
            series = [(k, *system(k, R, 1000 * i + j, regime)) for j, k in enumerate(KINDS) for i in range(n)]
            core = torch.stack([x for _, x, _ in series], dim=1)[:, None, None]
            traj = Trajectory(core=core.to(torch.bfloat16 if regime == "bf16" else torch.float32))
            for method in ("dynamics", "paper"):
                got = classify(traj, method=method)
                cap = min(16, max(8, R // 2) // 2)  # the longest period the detector searches at this R
                for (kind, _, period), label, found in zip(series, got["behaviour"], got["period"]):
                    period = period if period <= cap else 0  # longer periods are quasi-periodic at this R
                    rows.append({"R": R, "regime": regime, "method": method, "truth": kind, "label": label,
                                 "correct": label == kind, "period": period,
                                 "period_ok": label == "orbit" and not pd.isna(found) and int(found) == period})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="systems per class, regime and R")
    args = ap.parse_args()
    start = time.perf_counter()
    df = accuracy(args.n)
    acc = df.pivot_table(index=["regime", "method", "truth"], columns="R", values="correct", aggfunc="mean")
    periodic = df[(df.method == "dynamics") & (df.period > 0)]
    exact = periodic.pivot_table(index="regime", columns="R", values="period_ok", aggfunc="mean")
    print(f"accuracy per class, regime and R ({args.n} random systems per cell, D = {D}; "
          f"{time.perf_counter() - start:.1f} s)")
    print(acc.round(3).to_string())
    floor = df[(df.method == "dynamics") & (df.regime == "bf16")]
    print("\nbf16: share labelled at_floor (motion under bfloat16's floor; a fixed point as far as it can tell):")
    print(floor.assign(at_floor=floor.label == "at_floor")
          .pivot_table(index="truth", columns="R", values="at_floor", aggfunc="mean").round(3).to_string())
    print("\nexact periods found (dynamics detector, orbits with an integer period):")
    print(exact.round(3).to_string())
    print("\nconfusions (dynamics detector):")
    wrong = df[(df.method == "dynamics") & ~df.correct]
    print(wrong.groupby(["regime", "truth", "label", "R"]).size().to_string() if len(wrong) else "none")


if __name__ == "__main__":
    main()
