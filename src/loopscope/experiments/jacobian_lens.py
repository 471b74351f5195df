"""Fit the Jacobian lens and the affine lens (`loopscope.stages.jacobian_lens`) on a live looped model, per (segment,
recurrence, layer), by streaming batches; then read every state through them beside the logit lens.

Jacobian lens fit. For a batch, one forward keeps every layer's output state h_s (prelude, each recurrence's block
layers, coda) in the autograd graph. A vector-Jacobian product with the cotangent u placed on every real token of
h_final gives, at every state s and token t at once, Σ_{t'} (∂h_final,t'/∂h_s,t)ᵀ u (only t' ≥ t contribute: the
model is causal). Weighted by 1/|V_b| on prompt b's real tokens and summed, that is (Σ_b (1/|V_b|) Σ_t J_s(t))ᵀ u for
every s from one backward pass. With probe vectors Q = [q_1 … q_k] (D × k, orthonormal) the fit keeps
Y_s = Σ_batches Qᵀ Σ_b (1/|V_b|) Σ_t J_s(t) ([k, D] per state, on the model's device) and the prompt count n, and
finishes with

    Ĵ_s = (D/k) · Q Y_s / n          (= E_prompts[(1/|V|) Σ_t Σ_t' ∂h_final,t'/∂h_s,t] when k = D).

k = D probes (Q = I, the default) give the exact J_s at the cost of D backward passes per batch; k < D random
orthonormal probes give an unbiased sketch (E[Q Qᵀ] = (k/D)·I) at k passes, with error growing like √(D/k).
Memory: k·D floats per state (the exact fit: D² per state: 64 KB at D = 128, 1.3 MB at D = 576, float64), never a
per-token matrix. Cost: the default model (D = 128), 4 prompts at R = 8: a few seconds on one core.

Affine lens fit: per state, the running sums G_s = Σ [h;1][h;1]ᵀ and C_s = Σ [h;1] h_finalᵀ over real tokens; the
least-squares translator is W = (G + λI)⁻¹ C, A_s = W[:D]ᵀ, b_s = W[D].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.models.looped import LoopedLM, recurrence_count

SiteForward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[Step, torch.Tensor]]]
RIDGE = 1e-6  # the affine lens's ridge, relative to tr(G)/(D+1): only keeps a rank-deficient G solvable


def looped_site_forward(model: LoopedLM, recurrences: int) -> SiteForward:
    """(ids, mask) → (h_final [B, T, D], {Step: h_s [B, T, D]}): one forward of `model` at R = `recurrences` keeping
    every layer's output (`resid_post` of prelude, block and coda layers) in the autograd graph, rooted at the
    embedding. h_final is the last coda layer's output, or the state after the last recurrence for a model without
    a coda (the residual the final norm reads)."""
    R = recurrence_count(recurrences)
    points = model.site_points("resid_post")
    P, K, C = model.cfg.n_prelude, model.cfg.n_block, model.cfg.n_coda

    def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[Step, torch.Tensor]]:
        states: dict[Step, torch.Tensor] = {}
        finals: list[torch.Tensor] = []

        def keep(module, args, kwargs, out):
            states[kwargs["step"]] = out

        def root(module, args, kwargs, out):  # gradients start at the embedding, not at the weights
            return out.detach().requires_grad_(True)

        def last_state(module, args, kwargs, out):
            finals.append(out)

        handles = [p.register_forward_hook(keep, with_kwargs=True) for p in points]
        handles.append(model.hook_embed.register_forward_hook(root, with_kwargs=True))
        if C == 0:
            handles.append(model.hook_state.register_forward_hook(last_state, with_kwargs=True))
        try:
            model(ids, recurrences=R)
        finally:
            for h in handles:
                h.remove()
        final = states[Step("coda", 0, C - 1)] if C else finals[-1]
        order = [Step("prelude", 0, i) for i in range(P)] + \
            [Step("core", t, j) for t in range(R) for j in range(K)] + [Step("coda", 0, i) for i in range(C)]
        return final, {s: states[s] for s in order}

    return run


class JacobianLensFit:
    """Streaming fit of J_s for every state s (see the module doc): `update` per batch, `finish` → {Step: Ĵ_s}.
    Running sums stay tensors on the states' device; nothing is moved to the host until `finish`."""

    def __init__(self, d_model: int, probes: int | None = None, seed: int = 0) -> None:
        if probes is not None and not 1 <= probes <= d_model:
            raise InputError(f"--jacobian-probes {probes}: choose 1..{d_model} (the model width), or none for exact")
        self.d = d_model
        self.k = d_model if probes is None else probes
        if probes is None:
            self.Q = torch.eye(d_model, dtype=torch.float64)
        else:
            gen = torch.Generator().manual_seed(seed)
            self.Q = torch.linalg.qr(torch.randn(d_model, self.k, generator=gen, dtype=torch.float64))[0]
        self.sites: list[Step] | None = None
        self.Y: torch.Tensor | None = None  # [S, k, D]
        self.n: torch.Tensor | None = None

    def update(self, forward: SiteForward, ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            final, states = forward(ids, mask)
            sites = list(states)
            if self.sites is None:
                self.sites = sites
                self.Y = torch.zeros(len(sites), self.k, self.d, dtype=torch.float64, device=final.device)
                self.n = torch.zeros((), dtype=torch.float64, device=final.device)
            elif sites != self.sites:
                raise InputError("every batch of a Jacobian-lens fit must run the same recurrences")
            m = mask.to(final.device, final.dtype)[..., None]  # (B, T, 1): real tokens
            m = m / m.sum(1, keepdim=True).clamp(min=1)  # 1/|V_b| on prompt b's real tokens: a mean per prompt
            inputs = [states[s] for s in sites]
            Q = self.Q.to(final.device, final.dtype)
            for i in range(self.k):
                grads = torch.autograd.grad(final, inputs, grad_outputs=m * Q[:, i], retain_graph=i < self.k - 1,
                                            allow_unused=True)
                g = torch.stack([torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)])
                real = (m > 0).to(g.dtype)
                self.Y[:, i] += (g * real).sum((1, 2)).double()  # (S, D): q_iᵀ Σ_b Σ_t J_s(t)/|V_b|, every state
            self.n += (mask.sum(1) > 0).sum()  # prompts

    def merge(self, other: JacobianLensFit) -> None:
        """Fold another fit's sums into this one (batches fitted elsewhere: another process, a resumed run)."""
        if other.sites is None:
            return
        if self.sites is None:
            self.sites, self.Y, self.n = other.sites, other.Y.clone(), other.n.clone()
            return
        if other.sites != self.sites or other.k != self.k:
            raise InputError("Jacobian-lens fits with different states or probes cannot be merged")
        self.Y += other.Y.to(self.Y.device)
        self.n += other.n.to(self.n.device)

    def finish(self) -> dict[Step, torch.Tensor]:
        if self.sites is None or float(self.n) == 0:
            raise InputError("the Jacobian-lens fit saw no prompts")
        Q = self.Q.to(self.Y.device)
        J = (self.d / self.k) * torch.einsum("dk,ske->sde", Q, self.Y) / self.n  # [S, D, D]
        return dict(zip(self.sites, J.float()))


class AffineLensFit:
    """Streaming least-squares affine translator per state, h_final ≈ A_s h + b_s (see the module doc)."""

    def __init__(self) -> None:
        self.sites: list[Step] | None = None
        self.G: torch.Tensor | None = None  # [S, D+1, D+1]
        self.C: torch.Tensor | None = None  # [S, D+1, D]

    def update(self, final: torch.Tensor, states: dict[Step, torch.Tensor], mask: torch.Tensor) -> None:
        sites = list(states)
        pos = mask.bool().to(final.device)
        y = final[pos].double()  # (N, D)
        X = torch.stack([states[s][pos] for s in sites]).double()  # (S, N, D)
        X = torch.cat([X, torch.ones(*X.shape[:2], 1, dtype=X.dtype, device=X.device)], -1)  # (S, N, D+1)
        if self.sites is None:
            self.sites = sites
            self.G = torch.zeros(len(sites), X.shape[-1], X.shape[-1], dtype=torch.float64, device=X.device)
            self.C = torch.zeros(len(sites), X.shape[-1], y.shape[-1], dtype=torch.float64, device=X.device)
        self.G += X.transpose(1, 2) @ X
        self.C += X.transpose(1, 2) @ y

    def finish(self) -> dict[Step, tuple[torch.Tensor, torch.Tensor]]:
        if self.sites is None:
            raise InputError("the affine-lens fit saw no tokens")
        d1 = self.G.shape[-1]
        lam = RIDGE * torch.diagonal(self.G, dim1=1, dim2=2).sum(-1) / d1  # (S,)
        W = torch.linalg.solve(self.G + lam[:, None, None] * torch.eye(d1, dtype=self.G.dtype, device=self.G.device),
                               self.C)  # (S, D+1, D)
        return {s: (W[i, :-1].T.float(), W[i, -1].float()) for i, s in enumerate(self.sites)}


def fit_and_read_lenses(loaded, prompts: list[str], recurrences: int, *, probes: int | None = None,
                        batch_size: int = 4, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Fit both lenses on the first half of `prompts` (all of them when there is one) and read every state of the
    other half through the logit, Jacobian and affine lenses. Returns (summary per state and lens, per-prompt
    rows, info: fit/eval prompts, probes, seconds)."""
    import time

    from loopscope.capture.prompts import encode_prompts
    from loopscope.experiments.stage_tables import looped_readout
    from loopscope.stages.jacobian_lens import lens_rows, lens_summary

    if not loaded.is_looped:
        raise InputError(f"{loaded.name} is not a looped model: the per-recurrence lenses need a LoopedLM")
    if not prompts:
        raise InputError("no prompts for the lens fit")
    model = loaded.model
    cfg = model.cfg
    R = recurrence_count(recurrences)
    half = max(1, len(prompts) // 2)
    fit_prompts, eval_prompts = prompts[:half], (prompts[half:] or prompts[:half])
    forward = looped_site_forward(model, R)
    device = next(model.parameters()).device
    jac, aff = JacobianLensFit(cfg.d_model, probes), AffineLensFit()
    t0 = time.perf_counter()
    for i in range(0, len(fit_prompts), batch_size):
        ids, mask, _ = encode_prompts(loaded.tokenizer, fit_prompts[i: i + batch_size], loaded.max_seq_len)
        ids, mask = ids.to(device), mask.to(device)
        jac.update(forward, ids, mask)
        with torch.no_grad():
            final, states = forward(ids, mask)
            aff.update(final.detach(), {s: h.detach() for s, h in states.items()}, mask)
    lenses = {"logit": None, "jacobian": jac.finish(), "affine": aff.finish()}
    t1 = time.perf_counter()
    readout = looped_readout(model)
    rows = []
    for i in range(0, len(eval_prompts), batch_size):
        ids, mask, _ = encode_prompts(loaded.tokenizer, eval_prompts[i: i + batch_size], loaded.max_seq_len)
        with torch.no_grad():
            final, states = forward(ids.to(device), mask.to(device))
            rows += lens_rows(readout, final.detach(), {s: h.detach() for s, h in states.items()}, mask, lenses,
                              first_prompt=half + i if prompts[half:] else i)
    rows = pd.DataFrame(rows)
    last = max(cfg.n_prelude + R * cfg.n_block + cfg.n_coda, 1)

    def depth_of(segment: str, recurrence: int, layer: int) -> tuple[int, float]:
        d = {"prelude": layer + 1, "core": cfg.n_prelude + recurrence * cfg.n_block + layer + 1,
             "coda": cfg.n_prelude + R * cfg.n_block + layer + 1}[segment]
        return d, d / last

    info = {"fit prompts": len(fit_prompts), "eval prompts": len(eval_prompts),
            "probes": "exact (D = %d VJPs per batch)" % cfg.d_model if probes is None else f"{probes} of {cfg.d_model}",
            "recurrences": R, "fit seconds": round(t1 - t0, 1), "read seconds": round(time.perf_counter() - t1, 1)}
    return lens_summary(rows, depth_of), rows, info


def lens_views(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What the report draws: per (metric, lens) the block's recurrence × layer matrix of the mean (rows
    recurrence, columns block layer), keyed "metric|lens"."""
    from loopscope.stages.jacobian_lens import LENS_COMPARISON_METRICS

    views = {}
    core = summary[summary.segment == "core"]
    for metric in LENS_COMPARISON_METRICS:
        for lens, part in core.groupby("lens", sort=False):
            views[f"{metric}|{lens}"] = part.pivot_table(index="recurrence", columns="layer",
                                                         values=f"{metric}_mean")
    return views


def agreement_at_last_recurrence(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per lens: each metric at the last block layer of the first, middle and last recurrence (the closing
    numbers of a report)."""
    core = summary[summary.segment == "core"]
    if core.empty:
        return pd.DataFrame()
    R, K = int(core.recurrence.max()) + 1, int(core.layer.max()) + 1
    picks = sorted({0, (R - 1) // 2, R - 1})
    rows = core[(core.layer == K - 1) & core.recurrence.isin(picks)]
    return rows[["lens", "recurrence", "top1_agreement_mean", "kl_to_final_mean", "final_top1_rank_mean"]] \
        .sort_values(["lens", "recurrence"]).reset_index(drop=True).assign(layer=K - 1).pipe(
            lambda d: d[["lens", "recurrence", "layer", *[c for c in d.columns if c.endswith("_mean")]]]) \
        .astype({"recurrence": np.int64})
