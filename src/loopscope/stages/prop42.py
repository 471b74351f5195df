"""Proposition 4.2 of Blayney et al. (2026), checked numerically on a LoopedLM.

The proposition (paper §3.2): for a block layer with tied W_Q, W_K, scores A(X) = X W_Q W_Kᵀ Xᵀ / √d and
S = row-softmax(A),

    ‖S(X_t) − S(X_{t−1})‖ ≤ L_sm · (2 B κ / √d) · ‖X_t − X_{t−1}‖,   L_sm = 1/2, ‖X‖ ≤ B, κ = ‖W_Q W_Kᵀ‖,

where X is the input of the score function: the NORMED layer input n1(X_in) (the argument of `layer.attn`),
one head at a time (W_Q^h, W_K^h ∈ R^{D×d}; under GQA head h uses K/V head h // (H / H_kv)).

Norms used here, consistently: Frobenius for S, X and ΔX (B = max(‖X_t‖_F, ‖X_{t−1}‖_F) over the prompt's
real tokens); spectral norms for the weights. Why the bound below holds for our attention:

1. Softmax: the Jacobian of a row softmax is diag(p) − ppᵀ, symmetric PSD with vᵀJv = Var_p(v) ≤ 1/2 for
   a unit v (Popoviciu), so each row is 1/2-Lipschitz in ℓ2 and, summing squared rows, ‖ΔS‖_F ≤ ½‖ΔA‖_F.
   The causal mask removes entries from each row's softmax, which only shrinks ‖ΔA‖ (real tokens never see
   right padding, so restricting to them is exact).
2. Biases (qkv_bias, Huginn's qk_bias) are absorbed by augmenting X̃ = [X, 1] and W̃ = [W; bᵀ]
   (A = X̃ W̃_Q W̃_Kᵀ X̃ᵀ/√d); ΔX̃ = ΔX and B uses ‖X̃‖_F = sqrt(‖X‖_F² + T).
3. RoPE rotates query row i and key row j by different orthogonal R_i, R_j, so A_ij = x_i W_Q R_iᵀR_j W_Kᵀ x_jᵀ
   is no longer X M Xᵀ with one M, and ‖W_Q W_Kᵀ‖ does NOT bound it (W_Q W_Kᵀ = 0 with RoPE scores ≠ 0 is
   possible; see the tests). We bound with the pre-RoPE projections instead: with Q = rot(X W_Q),
   K = rot(X W_K), ΔA = (ΔQ K_tᵀ + Q_{t−1} ΔKᵀ)/√d, and rotations preserve every row norm, so
   ‖ΔQ‖_F = ‖ΔX W_Q‖_F ≤ ‖ΔX‖_F ‖W_Q‖₂ and ‖K_t‖₂ ≤ ‖K_t‖_F = ‖X_t W_K‖_F ≤ ‖X_t‖_F ‖W_K‖₂. Hence
   ‖ΔA‖_F ≤ (2 B κ / √d) ‖ΔX‖_F with κ = ‖W̃_Q^h‖₂ · ‖W̃_K^h‖₂ ≥ ‖W̃_Q^h W̃_K^hᵀ‖₂ (the paper's κ,
   reported as `kappa_qk` for reference only).

So `bound = ½ · 2 B κ / √d · ‖ΔX‖_F` is a valid bound and `ratio = measured / bound` must be ≤ 1.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from loopscope.capture.record import Recorder
from loopscope.errors import InputError
from loopscope.models.hooks import Step
from loopscope.models.looped import Attention, LoopedLM
from loopscope.stages.attention_change import attention_change
from loopscope.stages.frames import require_prefix_mask

SOFTMAX_LIPSCHITZ = 0.5  # L_sm of a row softmax in ℓ2 (Nair 2025; Jacobian norm ≤ 1/2)


def prop42_bound(x_prev: torch.Tensor, x_curr: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                 head_dim: int) -> dict[str, float]:
    """Right-hand side of Prop. 4.2 for one head (Frobenius on X, spectral on weights; see module doc).

    x_prev, x_curr: (T, D') score-function inputs (bias-augmented if the layer has biases);
    w_q, w_k: (D', d) that head's (augmented) projections. Returns B, kappa, kappa_qk, input_change, bound.
    """
    x_prev, x_curr, w_q, w_k = (t.double() for t in (x_prev, x_curr, w_q, w_k))
    b = max(float(x_prev.norm()), float(x_curr.norm()))
    kappa = float(torch.linalg.matrix_norm(w_q, ord=2) * torch.linalg.matrix_norm(w_k, ord=2))
    kappa_qk = float(torch.linalg.matrix_norm(w_q @ w_k.T, ord=2))
    delta = float((x_curr - x_prev).norm())
    bound = SOFTMAX_LIPSCHITZ * 2 * b * kappa / math.sqrt(head_dim) * delta
    return {"input_bound": b, "kappa": kappa, "kappa_qk": kappa_qk, "input_change": delta, "bound": bound}


def head_projections(attn: Attention) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Per query head h: (W̃_Q^h, W̃_K^h) of shape (D [+1], d), K taken from kv head h // (H / H_kv).

    The extra row holds the bias (q/k_proj bias + qk_bias) when the layer has any bias.
    """
    H, Hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    has_bias = attn.q_proj.bias is not None or attn.qk_bias is not None
    wq_all, wk_all = attn.q_proj.weight.detach().cpu().double(), attn.k_proj.weight.detach().cpu().double()
    qs, ks = [], []
    for h in range(H):
        g = h // (H // Hkv)
        wq, wk = wq_all[h * d:(h + 1) * d].T, wk_all[g * d:(g + 1) * d].T  # (D, d)
        if has_bias:
            bq, bk = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
            if attn.q_proj.bias is not None:
                bq = bq + attn.q_proj.bias.detach().cpu().double()[h * d:(h + 1) * d]
                bk = bk + attn.k_proj.bias.detach().cpu().double()[g * d:(g + 1) * d]
            if attn.qk_bias is not None:
                bq = bq + attn.qk_bias.detach().cpu().double()[0, h]
                bk = bk + attn.qk_bias.detach().cpu().double()[1, h]
            wq, wk = torch.cat([wq, bq[None]]), torch.cat([wk, bk[None]])
        qs.append(wq)
        ks.append(wk)
    return qs, ks, has_bias


@torch.no_grad()
def attention_lipschitz_check(
    model: LoopedLM,
    input_ids: torch.Tensor,
    recurrences: int | None = None,
    *,
    mask: torch.Tensor | None = None,
    state_seed: int | None = None,
    initial_state: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Measure ‖S_{j,t} − S_{j,t−1}‖_F and its Prop. 4.2 bound for every block layer j, recurrence t ≥ 1,
    prompt and head of one forward of `model` on `input_ids` (B, T) (right padding given by `mask`).

    Captures the attention probabilities (attn.hook_pattern, via `Recorder`) and the score-function input
    n1(X) (a forward pre-hook on each block layer's `attn`, labelled by kwargs["step"]) itself.
    Columns: segment, recurrence, layer, depth, relative_depth, batch, head, n_tokens, head_dim, measured,
    input_change (‖ΔX‖_F), input_bound (B), kappa, kappa_qk, bound, ratio (= measured / bound, ≤ 1).
    """
    if not isinstance(model, LoopedLM):
        raise InputError("attention_lipschitz_check needs a LoopedLM (it reads its weights); "
                         f"got {type(model).__name__}")
    R = model.cfg.recurrences if recurrences is None else int(recurrences)
    if R < 2:
        raise InputError("Prop. 4.2 compares consecutive recurrences: use recurrences ≥ 2")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.bool)
    require_prefix_mask(mask)
    inputs: dict[Step, torch.Tensor] = {}

    def keep_input(module, args, kwargs):
        inputs[kwargs["step"]] = args[0].detach().cpu()

    handles = [layer.attn.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in model.core]
    try:
        with Recorder(model, attention=True) as rec:
            model(input_ids, recurrences=R, state_seed=state_seed, initial_state=initial_state)
    finally:
        for h in handles:
            h.remove()
    traj = rec.trajectory(token_ids=input_ids.detach().cpu(), mask=mask)
    measured = attention_change(traj, per_head=True, per_prompt=True).rename(columns={"attention_change": "measured"})

    d = model.cfg.head_size
    lengths = mask.sum(1).tolist()
    bounds = []
    for j, layer in enumerate(model.core):
        w_qs, w_ks, has_bias = head_projections(layer.attn)
        for t in range(1, R):
            for b, n in enumerate(lengths):
                x_curr = inputs[Step("core", t, j)][b, :n].double()
                x_prev = inputs[Step("core", t - 1, j)][b, :n].double()
                if has_bias:
                    ones = torch.ones(n, 1, dtype=torch.float64)
                    x_curr, x_prev = torch.cat([x_curr, ones], 1), torch.cat([x_prev, ones], 1)
                for h, (wq, wk) in enumerate(zip(w_qs, w_ks)):
                    bounds.append({"recurrence": t, "layer": j, "batch": b, "head": h, "n_tokens": n, "head_dim": d,
                                   **prop42_bound(x_prev, x_curr, wq, wk, d)})
    out = measured.merge(pd.DataFrame(bounds), on=["recurrence", "layer", "batch", "head"], validate="one_to_one")
    out["ratio"] = out["measured"] / out["bound"]
    order = ["segment", "recurrence", "layer", "depth", "relative_depth", "batch", "head", "n_tokens", "head_dim",
             "measured", "input_change", "input_bound", "kappa", "kappa_qk", "bound", "ratio"]
    return out[order]
