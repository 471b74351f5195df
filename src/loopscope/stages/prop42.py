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

import numpy as np
import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.stages.attention_change import head_frobenius_change
from loopscope.stages.frames import require_prefix_mask

SOFTMAX_LIPSCHITZ = 0.5  # L_sm of a row softmax in ℓ2 (Nair 2025; Jacobian norm ≤ 1/2)
COLUMNS = ["segment", "recurrence", "layer", "depth", "relative_depth", "batch", "head", "n_tokens", "head_dim",
           "measured", "input_change", "input_bound", "kappa", "kappa_qk", "bound", "ratio"]
MEASURED = ["measured", "input_bound", "input_change", "bound"]  # the columns computed on the states' device


def prop42_bound(x_prev: torch.Tensor, x_curr: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                 head_dim: int) -> dict[str, float]:
    """Right-hand side of Prop. 4.2 for one head (Frobenius on X, spectral on weights; see module doc).

    x_prev, x_curr: (T, D') score-function inputs (bias-augmented if the layer has biases);
    w_q, w_k: (D', d) that head's (augmented) projections. Returns B, kappa, kappa_qk, input_change, bound.
    """
    x_prev, x_curr, w_q, w_k = (t.double() for t in (x_prev, x_curr, w_q, w_k))
    kappa, kappa_qk = head_kappas(w_q, w_k)
    return bound_from(x_prev, x_curr, kappa, kappa_qk, head_dim)


def head_kappas(w_q: torch.Tensor, w_k: torch.Tensor) -> tuple[float, float]:
    """(κ = ‖W̃_Q‖₂ ‖W̃_K‖₂, the paper's ‖W̃_Q W̃_Kᵀ‖₂) of one head, from the d × d triangles of W̃_Q = Q_a R_a and
    W̃_K = Q_b R_b (Q orthonormal columns): ‖W̃_Q‖₂ = ‖R_a‖₂ and W̃_Q W̃_Kᵀ = Q_a (R_a R_bᵀ) Q_bᵀ, so ‖W̃_Q W̃_Kᵀ‖₂ =
    ‖R_a R_bᵀ‖₂. O(D d²) instead of the SVD of a D × D product (Huginn-0125: D = 5280, 440 heads, which took
    minutes on a GPU and hours on a CPU)."""
    r_a = torch.linalg.qr(w_q.double(), mode="r").R
    r_b = torch.linalg.qr(w_k.double(), mode="r").R
    spectral = torch.linalg.matrix_norm(torch.stack([r_a, r_b, r_a @ r_b.T]), ord=2).tolist()
    return spectral[0] * spectral[1], spectral[2]


def bound_from(x_prev: torch.Tensor, x_curr: torch.Tensor, kappa: float, kappa_qk: float,
               head_dim: int) -> dict[str, float]:
    b = max(float(x_prev.norm()), float(x_curr.norm()))
    delta = float((x_curr - x_prev).norm())
    bound = SOFTMAX_LIPSCHITZ * 2 * b * kappa / math.sqrt(head_dim) * delta
    return {"input_bound": b, "kappa": kappa, "kappa_qk": kappa_qk, "input_change": delta, "bound": bound}


class Prop42Check(Accumulator):
    """Measured ‖S_{j,t} − S_{j,t−1}‖_F per head against its Prop. 4.2 bound, for every block layer j, recurrence
    t ≥ 1 and prompt, as each score-function input and pattern is produced (only recurrence t − 1 is kept), on their
    device in float64; the batch's values reach the host once, in `end`.

    `projections`: `loopscope.models.weights.attention_projections(model)` — plain tensors, computed once."""

    name = "prop42"
    sites = frozenset({"attn_in", "pattern"})
    needs_attention = True

    def __init__(self, projections: dict) -> None:
        self.head_dim = int(projections["head_dim"])
        self.kappas = {j: [head_kappas(q, k) for q, k in zip(qs, ks)]
                       for j, (qs, ks, _) in projections["layers"].items()}
        self.has_bias = {j: bias for j, (_, _, bias) in projections["layers"].items()}

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        if ctx.recurrences < 2:
            raise InputError("Prop. 4.2 compares consecutive recurrences: use recurrences ≥ 2")
        require_prefix_mask(ctx.mask)
        self.lengths = ctx.mask.sum(1).tolist()
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.patterns: dict[int, list[torch.Tensor]] = {}
        self.current_input: dict[int, list[torch.Tensor]] = {}
        self.kappa_tensors: dict[tuple, torch.Tensor] = {}
        self.rows: list[dict] = []  # identifying columns and κ (Python values)
        self.observed: list[torch.Tensor] = []  # [heads, MEASURED] per (state, prompt), float64 on the device

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core":
            return
        j, t = step.layer, step.recurrence
        if site == "attn_in":
            rows = []
            for b, n in enumerate(self.lengths):
                xb = x[b, :n].double()
                if self.has_bias[j]:
                    xb = torch.cat([xb, torch.ones(n, 1, dtype=torch.float64, device=xb.device)], 1)
                rows.append(xb)
            self.current_input[j] = rows
            return
        pats = [x[b, :, :n, :n] for b, n in enumerate(self.lengths)]
        if j not in self.current_input:
            raise InputError("Prop. 4.2 needs each block layer's attention input: stream a model, or capture the "
                             "Trajectory with sites=['attn_in'] (and attention=True)")
        inputs = self.current_input.pop(j)
        if j in self.patterns:
            depth = self.ctx.depth(step)
            ids = {"segment": "core", "recurrence": t, "layer": j, "depth": depth,
                   "relative_depth": depth / max(self.ctx.last_depth, 1)}
            kappa = self.kappa_of(j, x.device)
            for b, n in enumerate(self.lengths):
                measured = head_frobenius_change(pats[b], self.patterns[j][b])  # (H,), on the device
                x_prev, x_curr = self.inputs[j][b], inputs[b]
                prev_norm, curr_norm = x_prev.norm(), x_curr.norm()
                bound_in = torch.where(curr_norm > prev_norm, curr_norm, prev_norm)  # max(); the same for every head
                delta = (x_curr - x_prev).norm()
                bound = SOFTMAX_LIPSCHITZ * 2 * bound_in * kappa / math.sqrt(self.head_dim) * delta
                self.rows += [{**ids, "batch": self.ctx.first_prompt + b, "head": h, "n_tokens": n,
                               "head_dim": self.head_dim, "kappa": k, "kappa_qk": k_qk}
                              for h, (k, k_qk) in enumerate(self.kappas[j])]
                self.observed.append(torch.stack([measured, bound_in.expand_as(measured), delta.expand_as(measured),
                                                  bound], dim=1))
        self.patterns[j], self.inputs[j] = pats, inputs

    def kappa_of(self, j: int, device: torch.device) -> torch.Tensor:
        """Layer j's κ per head as a float64 tensor on `device` (made once per layer and device)."""
        key = (j, device)
        if key not in self.kappa_tensors:
            self.kappa_tensors[key] = torch.tensor([k for k, _ in self.kappas[j]], dtype=torch.float64, device=device)
        return self.kappa_tensors[key]

    def end(self) -> Part:
        frame = pd.DataFrame(self.rows)
        if len(frame):
            values = torch.cat(self.observed).cpu().numpy()  # the batch's one host transfer
            for i, c in enumerate(MEASURED):
                frame[c] = values[:, i]
            frame["ratio"] = frame["measured"] / frame["bound"]
            frame = frame[COLUMNS]
        return {"rows": frame}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        frames = [p["rows"] for p in parts if len(p["rows"])]
        if not frames:
            raise InputError("no attention was captured for the Prop. 4.2 check; capture with attention")
        out = pd.concat(frames, ignore_index=True)
        return out.sort_values(["depth", "batch", "head"], kind="stable").reset_index(drop=True)


def attention_state_relation(checks: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The empirical content of Prop. 4.2 (Blayney et al. 2026 §3.2): attention change tracks state change.

        ρ_s = Spearman( ‖S(X_t) − S(X_{t−1})‖_F , ‖X_t − X_{t−1}‖_F )

    over every block-layer check row (recurrence t ≥ 1, layer, prompt, head) of `Prop42Check`, with a 95 %
    percentile bootstrap interval that resamples prompts (rows of one prompt share its context). Unlike the bound
    (measured/bound ≤ 1 is the theorem itself), ρ_s can come out either way: near 0 if attention moved
    independently of the state. Returns {"spearman", "spearman_lo", "spearman_hi", "n_checks", "n_prompts"}."""
    core = checks[(checks["segment"] == "core")].dropna(subset=["measured", "input_change"])
    if len(core) < 3 or core["measured"].nunique() < 2 or core["input_change"].nunique() < 2:
        return {"spearman": math.nan, "spearman_lo": math.nan, "spearman_hi": math.nan, "n_checks": len(core),
                "n_prompts": int(core["batch"].nunique()) if len(core) else 0}

    x, y = core["measured"].to_numpy(float), core["input_change"].to_numpy(float)
    _, prompt_of = np.unique(core["batch"].to_numpy(), return_inverse=True)
    n_prompts = int(prompt_of.max()) + 1
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_prompts, n_prompts), minlength=n_prompts)
                       for _ in range(n_boot)]).astype(np.float64)  # [n_boot, prompts]: how often each is drawn
    chunk = max(1, 4_000_000 // len(x))  # replicates per step: [chunk, rows] arrays stay ~32 MB at any scale
    reps = np.concatenate([weighted_spearman(x, y, counts[i: i + chunk, prompt_of]) for i in range(0, n_boot, chunk)])
    lo, hi = np.nanquantile(reps, [0.025, 0.975])
    point = float(weighted_spearman(x, y, np.ones((1, len(x))))[0])
    return {"spearman": point, "spearman_lo": float(lo), "spearman_hi": float(hi), "n_checks": len(core),
            "n_prompts": n_prompts}


def weighted_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank, as pandas' `rank`) of the multiset in which row i of `v`
    appears w[r, i] times, for every replicate r: rank_i = W(< v_i) + (W(= v_i) + 1) / 2. v [n], w [reps, n]."""
    order = np.argsort(v, kind="stable")
    values, starts = np.unique(v[order], return_index=True)
    per_value = np.add.reduceat(w[:, order], starts, axis=1)  # [reps, unique values]
    below = np.cumsum(per_value, axis=1) - per_value
    rank_of_value = below + (per_value + 1) / 2
    which = np.searchsorted(values, v)
    return rank_of_value[:, which]


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman ρ of (x, y) over the multiset with multiplicities w [reps, n], one per replicate: the Pearson
    correlation of the multiset's average ranks, weighted by w — exactly `np.corrcoef` of the ranks of the
    expanded sample (a bootstrap replicate that draws a prompt twice holds its rows twice). NaN where a replicate's
    ranks are constant."""
    a, b = weighted_ranks(x, w), weighted_ranks(y, w)
    total = w.sum(1, keepdims=True)
    a = a - (w * a).sum(1, keepdims=True) / total
    b = b - (w * b).sum(1, keepdims=True) / total
    cov, va, vb = (w * a * b).sum(1), (w * a * a).sum(1), (w * b * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = cov / np.sqrt(va * vb)
    return np.where((va > 0) & (vb > 0), rho, np.nan)
