"""Where massive activations appear: the layer whose output first carries them (the onset layer).

Sun et al. 2024 ("Massive Activations in Large Language Models", §2) find that massive activations appear
abruptly after one early layer and then stay nearly constant along depth; Blayney et al. 2026 §5 (Fig. 41) zero
the MLP of that layer ("the MLP in the second layer of Retrofitted Llama, the layer responsible for its massive
activations") and the stages vanish. The rule used here, on a `residual_norms` table (one row per state):

    peak(s)   = mean over prompts of max_{i,d} |X_s,id|            (`max_abs_activation_mean`)
    onset     = the earliest state s in realized order (prelude, block t = 0, 1, …, coda; the embedding is
                never a candidate) with peak(s) ≥ ½ · max_{s' in the first pass} peak(s'), where the first pass
                is the prelude and the block's recurrence 0 (a feedforward model: every layer)
    layer     = the physical layer (segment, layer) of that state; for a block layer its MLP is zeroed at
                every recurrence, because the block's weights are the same at each one.

The ½ threshold picks the step up to the plateau, not whichever plateau state happens to be a little larger.
The maximum is taken over the first pass because later passes re-run the same weights: in a looped model the
peak can keep growing over recurrences (the healed SmolLM2 retrofit: ~1.6·10⁴ entering the loop, more after
it), and half of that later maximum would move the onset from the layer that wrote the activations (SmolLM2's
layer 11, in the prelude there) into the block.
Also reported per state: growth(s) = peak(s) / peak(previous state) and the ratio peak / median |X| (Sun et al.
call activations ~10³–10⁴ × the median massive; `MASSIVE_RATIO` = 100 is the lenient line used here to say
whether a model has massive activations at all).
"""

from __future__ import annotations

import pandas as pd

from loopscope.errors import InputError

ONSET_FRACTION = 0.5
MASSIVE_RATIO = 100.0


def massive_activation_profile(norms: pd.DataFrame) -> pd.DataFrame:
    """Per state (realized order): segment, recurrence, layer, depth, peak, median, ratio, growth, onset (bool)."""
    need = ["segment", "recurrence", "layer", "depth", "max_abs_activation_mean", "median_abs_activation_mean"]
    missing = [c for c in need if c not in norms.columns]
    if missing:
        raise InputError(f"the table lacks {missing}; pass loopscope.stages.residual_norms(traj)")
    frame = norms[norms.segment != "embed"].sort_values("depth", kind="stable").reset_index(drop=True)
    if frame.empty:
        raise InputError("the table has no layer states; capture a model with at least one layer")
    out = frame[["segment", "recurrence", "layer", "depth"]].copy()
    out["peak"] = frame["max_abs_activation_mean"].astype(float)
    out["median"] = frame["median_abs_activation_mean"].astype(float)
    out["ratio"] = out["peak"] / out["median"]
    previous = norms[norms.segment == "embed"]["max_abs_activation_mean"]
    first = float(previous.iloc[0]) if len(previous) else float("nan")
    out["growth"] = out["peak"] / out["peak"].shift(1, fill_value=first)
    in_first_pass = (out["segment"] == "prelude") | ((out["segment"] == "core") & (out["recurrence"] == 0))
    top = out.loc[in_first_pass, "peak"].max() if in_first_pass.any() else out["peak"].max()
    onset = int((out["peak"] >= ONSET_FRACTION * top).idxmax())
    out["onset"] = out.index == onset
    return out


def massive_activation_layer(norms: pd.DataFrame) -> dict:
    """The onset state of `massive_activation_profile`: segment, layer, recurrence, depth, peak, ratio, growth,
    and `massive` (ratio ≥ MASSIVE_RATIO: whether the model has massive activations at all)."""
    profile = massive_activation_profile(norms)
    row = profile[profile.onset].iloc[0]
    return {"segment": str(row.segment), "layer": int(row.layer), "recurrence": int(row.recurrence),
            "depth": int(row.depth), "peak": float(row.peak), "ratio": float(row.ratio),
            "growth": float(row.growth), "max_ratio": float(profile["ratio"].max()),
            "massive": bool(profile["ratio"].max() >= MASSIVE_RATIO)}
