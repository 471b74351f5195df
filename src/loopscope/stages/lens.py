"""Logit lens and coda lens: read every state as a next-token distribution.

- Logit lens (nostalgebraist 2020; Lad et al. 2024 use its entropy per layer): logits = W_U · n_f(x),
  the model's final norm then unembedding, applied to each state x.
- Coda lens (Lu et al. 2025, "Latent Chain-of-Thought? Decoding the Depth-Recurrent Transformer"):
  run what the model runs after its block on the state (any pre-coda norm, the coda layers, the final
  norm) then W_U. A coda state i runs only the remaining coda layers i+1.. (so the last coda state reads
  exactly the model's output).

Per state and real token, with p = softmax(logits):
- `entropy`: H(p) = −Σ_v p_v log p_v in nats (Lad et al. report it in bits; divide by log 2);
- `final_top1_rank`: the rank under the lens of the model's final top-1 prediction v* = argmax of the
  model's final logits (`traj.logits`; if absent, of the logit lens at the last realized state):
  rank = #{v : logits_v > logits_v*}, so 0 = the lens's argmax is the model's answer (Lu et al. track
  such ranks);
- `final_top1_match`: 1 when that rank is 0.
Each prompt's tokens are averaged; the table keeps mean / std over prompts.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.stages.frames import prompt_states, require_prefix_mask, state_at, summarise
from loopscope.stages.readout import Readout

LENS_METRICS = ["entropy", "final_top1_rank", "final_top1_match"]


def distribution_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token entropy (nats), rank of `target` and whether it is the argmax. logits (T, V), target (T,)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    chosen = logits.gather(-1, target[:, None])
    rank = (logits > chosen).sum(-1).double()
    return {"entropy": entropy, "final_top1_rank": rank, "final_top1_match": (rank == 0).double()}


def final_predictions(traj: Trajectory, readout: Readout) -> torch.Tensor:
    """v* per (prompt, token): argmax of the model's final logits, or of the logit lens at the last state."""
    if traj.logits is not None:
        return traj.logits.argmax(-1).cpu()
    last = traj.realized_index().iloc[-1]
    return readout.logits(state_at(traj, last.segment, int(last.recurrence), int(last.layer))).argmax(-1).cpu()


def lens_start(segment: str, layer: int) -> int:
    """Coda layer at which the coda lens starts for a state: 0, or i + 1 for coda state i."""
    return layer + 1 if segment == "coda" else 0


def logit_lens(
    traj: Trajectory,
    readout: Readout,
    *,
    lens: Literal["logit", "coda"] = "logit",
    per_prompt: bool = False,
    include_embed: bool = False,
) -> pd.DataFrame:
    """Lens entropy and rank of the model's final answer for every state.

    Columns: STATE_COLUMNS, `lens` ("logit" | "coda"), and for m in LENS_METRICS `m_mean`, `m_std`, `n`
    (prompts); per_prompt=True gives one raw row per (state, batch) with `n_tokens` and the metrics
    averaged over that prompt's real tokens.
    """
    if lens not in ("logit", "coda"):
        raise InputError(f"lens={lens!r}; use 'logit' or 'coda'")
    if traj.d_model != readout.d_model:
        raise InputError(f"trajectory width {traj.d_model} does not match the readout's {readout.d_model}: "
                         "build the Readout from the model that produced the trajectory")
    if lens == "coda":
        if readout.coda is None:
            raise InputError("this readout has no coda (the model has no coda layers); use lens='logit'")
        require_prefix_mask(traj.mask)
    targets = final_predictions(traj, readout)
    rows = []
    for ids, b, pos, x in prompt_states(traj, include_embed=include_embed):
        if lens == "coda":
            x = readout.coda(x[None], lens_start(ids["segment"], ids["layer"]))[0]
        metrics = distribution_metrics(readout.logits(x).cpu(), targets[b].index_select(0, pos))
        rows.append({**ids, "batch": b, "n_tokens": len(pos), **{k: float(v.mean()) for k, v in metrics.items()}})
    raw = pd.DataFrame(rows)
    out = raw if per_prompt else summarise(raw, LENS_METRICS, over=["batch"])
    out.insert(5, "lens", lens)
    return out
