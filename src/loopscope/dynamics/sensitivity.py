"""How much of a non-fixed-point rate is the threshold's choice (beyond Blayney et al. App. C, whose rates "depend
strongly" on τ and ρ, chosen by eye).

For each detector and each of its deciding thresholds, the threshold is moved over a grid fixed here, before any
run (`SWEEPS`, the default value always included), the others held at their defaults, and the rate of tokens not
labelled `fixed_point` is recomputed from the collected statistics (no new capture), with a 95 % bootstrap interval
over prompts (`loopscope.evidence`).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pandas as pd

from loopscope.dynamics.behaviour import BehaviourStats
from loopscope.dynamics.rule_dynamics import AT_FLOOR, FIXED
from loopscope.evidence import bootstrap_ratio, bootstrap_weights

# threshold -> values swept (spanning ~an order of magnitude either side of the default, or its natural range)
SWEEPS = {
    "dynamics": {
        "noise_tol": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
        "z": [1.0, 2.0, 3.0, 5.0, 10.0],
        "rate_margin": [0.0, 1e-4, 1e-3, 1e-2, 3e-2],
        "orbit_tol": [0.02, 0.05, 0.1, 0.2, 0.4],
        "quasi_tol": [0.1, 0.25, 0.5, 0.75, 0.9],
        "rough_cosine": [-0.5, -0.25, 0.0, 0.25, 0.5],
        "drift_f": [1.5, 2.0, 3.0, 5.0, 9.0, 30.0],
        "drift_persistence": [0.25, 0.5, 0.7, 0.9],
    },
    "paper": {
        "tau": [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
        "rho": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
    },
}


def threshold_sweep(stats: BehaviourStats, layer: int = -1, methods: tuple[str, ...] = ("dynamics", "paper"),
                    seed: int = 0) -> pd.DataFrame:
    """One row per (method, threshold, value): [method, threshold, value, default, non_fixed_rate, ci_low,
    ci_high, n_tokens, n_prompts] on block layer `layer`."""
    prompts, inverse = np.unique(stats.batch.numpy(), return_inverse=True)
    n_tokens = np.bincount(inverse, minlength=len(prompts)).astype(np.float64)
    weights = bootstrap_weights(len(prompts), seed=seed)
    rows = []
    for method in methods:
        j = layer % stats.block_size
        if method not in stats.layers.get(j, {}):
            continue
        base = stats.dynamics if method == "dynamics" else stats.paper
        defaults = {f.name: getattr(base, f.name) for f in fields(base)}
        for name, values in SWEEPS[method].items():
            for value in sorted({*values, defaults[name]}):
                code = stats.labels(j, method, **{name: value}).code.numpy()
                moving = ((code != FIXED) & (code != AT_FLOOR)).astype(np.float64)  # at_floor: fixed as far as seen
                non_fixed = np.bincount(inverse, weights=moving, minlength=len(prompts))
                rate, lo, hi = bootstrap_ratio(non_fixed, n_tokens, weights=weights)
                rows.append({"method": method, "threshold": name, "value": float(value),
                             "default": bool(value == defaults[name]), "non_fixed_rate": float(rate),
                             "ci_low": float(lo), "ci_high": float(hi), "n_tokens": int(n_tokens.sum()),
                             "n_prompts": len(prompts)})
    return pd.DataFrame(rows)
