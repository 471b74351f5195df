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

from loopscope.accumulate.core import BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.stages.frames import PromptRows, require_prefix_mask
from loopscope.stages.readout import Readout

LENS_METRICS = ["entropy", "final_top1_rank", "final_top1_match"]


def distribution_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token entropy (nats), rank of `target` and whether it is the argmax. logits (T, V), target (T,).

    In the logits' own float32 (or wider): the entropy's rounding error is ~1e-7 relative, far below any
    difference the stage profiles draw, and a float64 softmax over the vocabulary cost a third of the lens."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).double()
    chosen = logits.gather(-1, target[:, None])
    rank = (logits > chosen).sum(-1).double()
    return {"entropy": entropy, "final_top1_rank": rank, "final_top1_match": (rank == 0).double()}


class LogitLens(PromptRows):
    """Lens entropy and rank of the final prediction for every state and prompt, as each state is produced; the
    final prediction (argmax of the model's final logits) comes from the batch's finals."""

    name = "logit_lens"
    values = LENS_METRICS
    sites = frozenset({"resid_post", "embed"})
    needs_finals = True

    def __init__(self, readout: Readout, lens: str = "logit", over: list[str] | None = None, raw: bool = False,
                 include_embed: bool = False) -> None:
        super().__init__(["batch"] if over is None else over, raw, include_embed)
        if lens not in ("logit", "coda"):
            raise InputError(f"lens={lens!r}; use 'logit' or 'coda'")
        if lens == "coda" and readout.coda is None:
            raise InputError("this readout has no coda (the model has no coda layers); use lens='logit'")
        self.name = f"{lens}_lens"
        self.readout, self.lens = readout, lens

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        if self.lens == "coda":
            require_prefix_mask(ctx.mask)
        prediction = None if ctx.finals is None else ctx.finals.prediction
        self.targets = None if prediction is None else on(prediction, self.readout.unembedding.device)
        self.pending: list[tuple[dict, torch.Tensor]] = []

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if not self.wants(site, step):
            return
        if x.shape[-1] != self.readout.d_model:
            raise InputError(f"trajectory width {x.shape[-1]} does not match the readout's {self.readout.d_model}: "
                             "build the Readout from the model that produced the trajectory")
        ids = self.ids(step)
        if self.targets is None:  # no final logits: the target is the lens at the last state, known at the end
            self.pending.append((ids, x.detach()))
            return
        self.record_state(ids, x, self.targets)

    def record_state(self, ids: dict, x: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one row per prompt: the lens metrics of its real tokens, averaged, on the unembedding's device.
        Prompt by prompt on purpose: one prompt's [T, V] logits stay in cache, the whole batch's do not (measured 3×
        slower batched on a CPU)."""
        positions = self.positions_on(targets.device)
        for b, prompt, pos, xb in self.prompts(x):
            if self.lens == "coda":
                xb = self.readout.coda(x[b: b + 1], lens_start(ids["segment"], ids["layer"]))[0]
                xb = xb.index_select(0, self.positions_on(xb.device)[b])
            metrics = distribution_metrics(self.readout.logits(xb), targets[b].index_select(0, positions[b]))
            self.record([{**ids, "batch": prompt, "n_tokens": len(pos)}],
                        torch.stack([metrics[m].mean() for m in self.values]))

    def end(self) -> Part:
        if self.pending:
            last = self.pending[-1][1]
            targets = self.readout.logits(last).argmax(-1)
            for ids, x in self.pending:
                self.record_state(ids, x, targets)
            self.pending = []
        return super().end()

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        out = super().combine(parts)
        out.insert(5, "lens", self.lens)
        return out


def on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device` (no copy, nor call, when it is there already)."""
    return t if t.device == device else t.to(device)


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
    averaged over that prompt's real tokens. The model's final answer is the argmax of `traj.logits` (or, when
    the Trajectory has no logits, of the logit lens at its last state).
    """
    if lens not in ("logit", "coda"):
        raise InputError(f"lens={lens!r}; use 'logit' or 'coda'")
    if traj.d_model != readout.d_model:
        raise InputError(f"trajectory width {traj.d_model} does not match the readout's {readout.d_model}: "
                         "build the Readout from the model that produced the trajectory")
    return run_on_trajectory(LogitLens(readout, lens, raw=per_prompt, include_embed=include_embed), traj)
