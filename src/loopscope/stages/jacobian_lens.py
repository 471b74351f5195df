"""Lenses through a fitted linear map per state: the Jacobian lens and an affine (least-squares) lens, read beside the
logit lens against the model's own final distribution.

- Logit lens (nostalgebraist 2020): ℓ(h) = W_U · n_f(h).
- Jacobian lens (Gurnee et al. 2026): ℓ(h) = W_U · n_f(J_s h) with, for state s = (segment, recurrence, layer),
  J_s = E_prompts[(1/|V|) Σ_{t∈V} Σ_{t'≥t} ∂h_final,t' / ∂h_s,t] (V: the prompt's real tokens; h_final: the residual
  the final norm reads, i.e. the coda's output). For the final state itself J = I, so the lens is the logit lens.
  Fitted by `experiments.jacobian_lens.JacobianLensFit` (vector-Jacobian products through the whole remaining
  forward; TransformerLens's implementation refuses looped models).
- Affine lens, a tuned-lens-style baseline (Belrose et al. 2023 train an affine translator per layer by KL; ours is
  the closed-form least-squares translator h_final ≈ A_s h + b_s, ridge 1e-6·tr(G)/(D+1), fitted per site on
  held-out-from-evaluation prompts): ℓ(h) = W_U · n_f(A_s h + b_s).

Per state, lens and prompt, averaged over its real tokens, against the model's final distribution p* (the readout
of h_final, i.e. the model's logits) with top-1 v* = argmax p*:
- `top1_agreement`: 1 when argmax ℓ(h) = v*;
- `kl_to_final`: KL(p* ‖ softmax ℓ(h)) = Σ_v p*_v (log p*_v − log p_v), nats;
- `final_top1_rank`: #{v : ℓ_v > ℓ_v*} (0 = agreement).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.stages.readout import Readout

LENS_COMPARISON_METRICS = ["top1_agreement", "kl_to_final", "final_top1_rank"]

Affine = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]  # A [D, D] (h ↦ A h) or (A, b): h ↦ A h + b


def lens_metrics(lens_logits: torch.Tensor, final_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, V] lens logits against [N, V] final logits → per-token top1_agreement, kl_to_final, final_top1_rank."""
    target = final_logits.argmax(-1)
    logp_final = torch.log_softmax(final_logits.double(), -1)
    logp = torch.log_softmax(lens_logits.double(), -1)
    kl = (logp_final.exp() * (logp_final - logp)).sum(-1)
    rank = (lens_logits > lens_logits.gather(-1, target[:, None])).sum(-1).double()
    return {"top1_agreement": (rank == 0).double(), "kl_to_final": kl, "final_top1_rank": rank}


def apply_map(h: torch.Tensor, affine: Affine | None) -> torch.Tensor:
    """A h (+ b) on [..., D] states (None: the identity)."""
    if affine is None:
        return h
    A, b = (affine, None) if isinstance(affine, torch.Tensor) else affine
    out = h.to(A.dtype) @ A.T
    return out if b is None else out + b


def lens_rows(readout: Readout, final: torch.Tensor, states: dict[Step, torch.Tensor], mask: torch.Tensor,
              lenses: dict[str, dict[Step, Affine] | None], first_prompt: int = 0) -> list[dict]:
    """One row per (lens, state, prompt): segment, recurrence, layer, lens, batch, n_tokens and the
    LENS_COMPARISON_METRICS averaged over the prompt's real tokens. final [B, T, D]: h_final (its readout is the
    model's distribution); states: Step → [B, T, D]; lenses: name → per-state maps (None: the logit lens; a state
    missing from a lens's maps is skipped for it)."""
    if final.shape[-1] != readout.d_model:
        raise InputError(f"state width {final.shape[-1]} does not match the readout's {readout.d_model}")
    rows = []
    for b in range(final.shape[0]):
        pos = torch.nonzero(mask[b].bool(), as_tuple=False).flatten().to(final.device)
        final_logits = readout.logits(final[b].index_select(0, pos))
        for step, h in states.items():
            hb = h[b].index_select(0, pos.to(h.device))
            for name, maps in lenses.items():
                if maps is not None and step not in maps:
                    continue
                logits = readout.logits(apply_map(hb, None if maps is None else maps[step]))
                metrics = lens_metrics(logits, final_logits.to(logits.device))
                rows.append({"segment": step.segment, "recurrence": step.recurrence, "layer": step.layer,
                             "lens": name, "batch": first_prompt + b, "n_tokens": len(pos),
                             **{k: float(v.mean()) for k, v in metrics.items()}})
    return rows


def lens_summary(rows: pd.DataFrame, depth_of) -> pd.DataFrame:
    """Per (state, lens): STATE_COLUMNS, lens, and m_mean, m_std (over prompts, ddof 1), n (prompts).
    depth_of(segment, recurrence, layer) → (depth, relative_depth)."""
    keys = ["segment", "recurrence", "layer", "lens"]
    g = rows.groupby(keys, sort=False)
    out = g[LENS_COMPARISON_METRICS].mean().add_suffix("_mean").join(
        g[LENS_COMPARISON_METRICS].std().add_suffix("_std")).join(g.size().rename("n")).reset_index()
    depths = [depth_of(s, r, j) for s, r, j in out[["segment", "recurrence", "layer"]].itertuples(index=False)]
    out.insert(3, "depth", [d for d, _ in depths])
    out.insert(4, "relative_depth", [rd for _, rd in depths])
    return out.sort_values(["depth", "lens"]).reset_index(drop=True)
