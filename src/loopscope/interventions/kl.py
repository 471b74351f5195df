"""How much an intervention changes the model's prediction: per-token KL and entropies (Lad et al. 2024)."""

from __future__ import annotations

import math

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError


def next_token_kl(baseline: Trajectory, intervened: Trajectory) -> pd.DataFrame:
    """KL between the final next-token distributions, one row per real (batch, token).

        kl = KL(p ‖ q) = Σ_v p(v) · (log p(v) − log q(v))   (nats), p = softmax(baseline logits),
                                                               q = softmax(intervened logits)
        base_entropy_bits / intervened_entropy_bits = −Σ_v p(v) log₂ p(v)

    Lad, Gurnee, Tegmark 2024 ("The Remarkable Robustness of LLMs: Stages of Inference?", §3, layer deletion and
    swapping; their `compute_kl_divergence(normal, intervened)` and base-2 entropy). Computed in float64.
    Also: base_top1 / intervened_top1 (argmax token ids) and top1_agrees.
    """
    if baseline.logits is None or intervened.logits is None:
        raise InputError("both trajectories need logits; capture them with loopscope.capture.capture")
    if baseline.logits.shape != intervened.logits.shape:
        raise InputError(f"logits shapes differ: {tuple(baseline.logits.shape)} vs {tuple(intervened.logits.shape)}; "
                         "run both on the same token ids")
    b, t = baseline.mask.nonzero(as_tuple=True)  # real tokens only, before the (N, V) work
    logp = torch.log_softmax(baseline.logits[b, t].double(), dim=-1)  # (N, V)
    logq = torch.log_softmax(intervened.logits[b, t].double(), dim=-1)
    p, q = logp.exp(), logq.exp()
    top_p, top_q = logp.argmax(-1), logq.argmax(-1)
    return pd.DataFrame({
        "batch": b.numpy(), "token": t.numpy(),
        "kl": (p * (logp - logq)).sum(-1).numpy(),
        "base_entropy_bits": (-(p * logp).sum(-1) / math.log(2)).numpy(),
        "intervened_entropy_bits": (-(q * logq).sum(-1) / math.log(2)).numpy(),
        "base_top1": top_p.numpy(), "intervened_top1": top_q.numpy(), "top1_agrees": (top_p == top_q).numpy(),
    })


def summarize_kl(kl: pd.DataFrame) -> pd.DataFrame:
    """One row: n (tokens), mean/median/max KL (nats), top-1 agreement rate, mean entropies (bits)."""
    if kl.empty:
        raise InputError("the KL table is empty: no real tokens were compared")
    return pd.DataFrame([{
        "n": len(kl), "mean_kl": kl["kl"].mean(), "median_kl": kl["kl"].median(), "max_kl": kl["kl"].max(),
        "top1_agreement": kl["top1_agrees"].mean(),
        "mean_base_entropy_bits": kl["base_entropy_bits"].mean(),
        "mean_intervened_entropy_bits": kl["intervened_entropy_bits"].mean(),
    }])
