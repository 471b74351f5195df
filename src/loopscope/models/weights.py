"""Plain-tensor views of a LoopedLM's weights, for analyses that read weights but never run the model.

- `attention_projections(model)`: per block layer, each query head's (W̃_Q^h, W̃_K^h) (Prop. 4.2's κ);
- `down_projections(model)`: every layer's MLP output weights (prediction / suppression neurons).
"""

from __future__ import annotations

import torch

from loopscope.models.looped import Attention, LoopedLM


def head_projections(attn: Attention) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Per query head h: (W̃_Q^h, W̃_K^h) of shape (D [+1], d), float64 on the CPU, K taken from kv head
    h // (H / H_kv). The extra row holds the bias (q/k_proj bias + Huginn's qk_bias) when the layer has any."""
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


def attention_projections(model: LoopedLM) -> dict:
    """{"head_dim": d, "layers": {j: (W̃_Q per head, W̃_K per head, has_bias)}} for every block layer j."""
    return {"head_dim": model.cfg.head_size,
            "layers": {j: head_projections(layer.attn) for j, layer in enumerate(model.core)}}


def down_projections(model: LoopedLM) -> dict[str, torch.Tensor]:
    """{"prelude.i" | "core.j" | "coda.i": down_proj weight (D, d_mlp)} of a LoopedLM."""
    return {f"{segment}.{i}": layer.mlp.down_proj.weight.detach()
            for segment in ("prelude", "core", "coda") for i, layer in enumerate(getattr(model, segment))}
