"""Accuracy of both per-token behaviour detectors on systems whose long-run behaviour is known exactly, per class
and per R (not a test: it prints a table).

Each class draws N random systems (D = 32, float32 like a captured state) with parameters spread over a range,
a random transient of 0–R/4 steps before the asymptotic regime, and a random overall scale 10^U(−3, 4):

    fixed_point  x* + ρ^t (x_0 − x*) + noise, ρ ~ U(0.3, 0.9), noise ~ U(0, 5 %) of ‖x*‖
    slider       x_0 + t·v + noisy steps (U(0, 10 %) of ‖v‖), ‖v‖ ~ U(0.02, 1) of ‖x_0‖
    orbit        rotation of exact period p ~ {2, …, 13} in a random plane around a random centre, or a
                 quasi-periodic rotation (irrational period in (2.5, 30)), optional 0–1 % noise
    divergent    geometric growth by λ ~ U(1.02, 1.5)

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

D = 32
RS = (32, 64, 128, 256)


def rand(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def unit(g):
    v = torch.randn(D, generator=g, dtype=torch.float64)
    return v / v.norm()


def system(kind: str, R: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(R, dtype=torch.float64)[:, None]
    if kind == "fixed_point":
        star = unit(g) * math.sqrt(D) * rand(g, 1, 5)
        x0 = torch.randn(D, generator=g, dtype=torch.float64) * math.sqrt(D)
        noise = rand(g, 0, 0.05) * star.norm() / math.sqrt(D)
        x = star + rand(g, 0.3, 0.9) ** t * (x0 - star) + torch.randn(R, D, generator=g, dtype=torch.float64) * noise
    elif kind == "slider":
        x0 = torch.randn(D, generator=g, dtype=torch.float64)
        v = unit(g) * x0.norm() * rand(g, 0.02, 1.0)
        steps = v + torch.randn(R, D, generator=g, dtype=torch.float64) * rand(g, 0, 0.1) * v.norm() / math.sqrt(D)
        x = x0 + torch.cumsum(steps, 0)
    elif kind == "orbit":
        q = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))[0]
        period = float(torch.randint(2, 14, (), generator=g)) if rand(g, 0, 1) < 0.6 else rand(g, 2.5, 30)
        angle = 2 * math.pi * t / period + rand(g, 0, 6.3)
        radius, offset = rand(g, 0.2, 2), rand(g, 0, 3)
        x = offset * q[:, 2] + radius * (angle.cos() * q[:, 0] + angle.sin() * q[:, 1])
        x = x + torch.randn(R, D, generator=g, dtype=torch.float64) * rand(g, 0, 0.01) * radius / math.sqrt(D)
    elif kind == "divergent":
        x = rand(g, 1.02, 1.5) ** t * torch.randn(D, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    length = int(rand(g, 0, R / 4))
    if length > 1:  # a random-walk transient that ends where the behaviour starts
        walk = torch.cumsum(torch.randn(length, D, generator=g, dtype=torch.float64) * 0.3 * x[length].norm()
                            / math.sqrt(D), 0)
        x = torch.cat([walk - walk[-1] + x[length], x[length:]])
    return x * 10 ** rand(g, -3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="systems per class and R")
    args = ap.parse_args()
    kinds = ("fixed_point", "slider", "orbit", "divergent")
    rows, start = [], time.perf_counter()
    for R in RS:
        series = [(k, system(k, R, 1000 * i + j)) for j, k in enumerate(kinds) for i in range(args.n)]
        core = torch.stack([x for _, x in series], dim=1)[:, None, None].float()
        traj = Trajectory(core=core)
        for method in ("dynamics", "paper"):
            got = classify(traj, method=method)["behaviour"].tolist()
            for (kind, _), label in zip(series, got):
                rows.append({"R": R, "method": method, "truth": kind, "label": label, "correct": label == kind})
    df = pd.DataFrame(rows)
    acc = df.pivot_table(index=["method", "truth"], columns="R", values="correct", aggfunc="mean")
    print(f"accuracy per class and R ({args.n} random systems per cell, D = {D}, float32; "
          f"{time.perf_counter() - start:.1f} s)")
    print(acc.round(3).to_string())
    print("\nconfusions (dynamics detector):")
    wrong = df[(df.method == "dynamics") & ~df.correct]
    print(wrong.groupby(["truth", "label", "R"]).size().to_string() if len(wrong) else "none")


if __name__ == "__main__":
    main()
