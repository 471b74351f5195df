"""Where a Hugging Face feedforward causal LM keeps its parts: decoder layers, final norm, sublayers, readout
and the weight matrices the analyses read. Loading is `models.hf`; recording its states is `capture.hf`.

Supported families (module names differ, the picture does not):

    llama-like (llama, qwen2, olmo2):  model.model.embed_tokens, model.model.layers[i].{self_attn, mlp},
                                       model.model.norm (RMSNorm), lm_head
    gpt2:                              model.transformer.drop (= wte + wpe), model.transformer.h[i].{attn, mlp},
                                       model.transformer.ln_f (LayerNorm), lm_head (tied to wte)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loopscope.errors import InputError


@dataclass(frozen=True)
class HFLayout:
    """Where a family keeps its pieces (dotted attribute paths from the CausalLM object)."""

    layers: str  # ModuleList of decoder layers
    embed: str  # module whose output is the stream entering layer 0 (HF hidden_states[0])
    final_norm: str  # norm applied after the last layer (HF hidden_states[-1] = final_norm(last layer output))
    attn: str  # attention submodule name inside a layer; its output is (attn_out, probs)
    mlp: str  # MLP submodule name inside a layer
    norm_kind: str  # "rms" | "layer"


LLAMA_LIKE = HFLayout("model.layers", "model.embed_tokens", "model.norm", "self_attn", "mlp", "rms")


GPT2 = HFLayout("transformer.h", "transformer.drop", "transformer.ln_f", "attn", "mlp", "layer")


LAYOUTS: dict[str, HFLayout] = {"llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "olmo2": LLAMA_LIKE, "gpt2": GPT2}



def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj



def is_hf_model(model: Any) -> bool:
    """True for a Hugging Face causal LM of a supported family (the capture adapter's predicate)."""
    config = getattr(model, "config", None)
    return isinstance(model, nn.Module) and getattr(config, "model_type", None) in LAYOUTS



def hf_layout(model: nn.Module) -> HFLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise InputError(
            f"model_type {model_type!r} is not supported; loopscope reads Hugging Face models of types "
            f"{sorted(LAYOUTS)}"
        )
    return LAYOUTS[model_type]



def hf_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in the order the forward runs them."""
    return _get(model, hf_layout(model).layers)



def set_hf_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Replace the decoder-layer ModuleList (used by interventions to delete/reorder layers)."""
    parent, _, name = hf_layout(model).layers.rpartition(".")
    setattr(_get(model, parent), name, layers)



def hf_final_norm(model: nn.Module) -> nn.Module:
    return _get(model, hf_layout(model).final_norm)



def hf_sublayer(model: nn.Module, layer: nn.Module, sublayer: str) -> nn.Module:
    """The attention ("attn") or MLP ("mlp") submodule of a decoder layer."""
    layout = hf_layout(model)
    if sublayer not in ("attn", "mlp"):
        raise InputError(f"sublayer {sublayer!r} unknown; use 'attn' or 'mlp'")
    return getattr(layer, layout.attn if sublayer == "attn" else layout.mlp)



def hf_readout(model: nn.Module) -> dict[str, Any]:
    """The logit-lens pieces: logits = W_U · n_f(x) with the model's own final norm.

    Returns {norm_weight (D,), norm_eps float, unembedding W_U (V, D), norm_kind "rms"|"layer", norm_bias (D,)|None}.
    rms:   n_f(x) = x / sqrt(mean(x²) + ε) · w          (Llama, Qwen2, OLMo-2)
    layer: n_f(x) = (x − mean x) / sqrt(var x + ε) · w + b  (GPT-2)
    Plain dict with the keyword names of `loopscope.stages.readout.Readout(...)`, so `Readout(**hf_readout(m))`.
    """
    layout = hf_layout(model)
    norm = hf_final_norm(model)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    bias = getattr(norm, "bias", None)
    return {
        "norm_weight": norm.weight.detach(),
        "norm_eps": float(eps),
        "unembedding": model.get_output_embeddings().weight.detach(),
        "norm_kind": layout.norm_kind,
        "norm_bias": None if bias is None else bias.detach(),
    }



def hf_mlp_down_weights(model: nn.Module) -> dict[int, torch.Tensor]:
    """W_out of every layer's MLP as {layer index: (D, d_mlp)}: column n is what neuron n writes to the stream.

    Llama-like: down_proj.weight (already (D, d_mlp)); GPT-2: c_proj is a Conv1D with weight (d_mlp, D) → transposed.
    """
    layout = hf_layout(model)
    out = {}
    for i, layer in enumerate(hf_layers(model)):
        mlp = getattr(layer, layout.mlp)
        out[i] = mlp.c_proj.weight.detach().T if layout is GPT2 else mlp.down_proj.weight.detach()
    return out



def hf_attention_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_Q, W_K) of decoder layer `layer`, each (H, D, d_head), in the convention of Blayney et al. §3.1:

        A_h(X) = (X W_Q[h]) (X W_K[h])ᵀ / √d_head,   X = the layer's normalised input n1(x) (B·T, D)

    Key heads are repeated for grouped-query attention so that W_K[h] is the key map query head h uses
    (kv head h // (H / H_kv), as HF's repeat_kv). Not included: RoPE (position-dependent rotation of q and k),
    q/k biases (Qwen2, GPT-2), OLMo-2's q/k norms. κ = ‖W_Q[h] W_K[h]ᵀ‖ in Prop. 4.2 is computed from these.
    """
    layers = hf_layers(model)
    if not 0 <= layer < len(layers):
        raise InputError(f"layer {layer} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    layout = hf_layout(model)
    attn = getattr(layers[layer], layout.attn)
    cfg = model.config
    H = cfg.num_attention_heads if layout is LLAMA_LIKE else cfg.n_head
    D = cfg.hidden_size
    if layout is GPT2:
        w = attn.c_attn.weight.detach()  # Conv1D (D, 3D): [q | k | v] = x @ w
        d = D // H
        wq = w[:, :D].reshape(D, H, d).permute(1, 0, 2)
        wk = w[:, D: 2 * D].reshape(D, H, d).permute(1, 0, 2)
        return wq, wk
    d = attn.head_dim
    wq = attn.q_proj.weight.detach().reshape(H, d, D).transpose(1, 2)  # Linear (H·d, D) → (H, D, d)
    wk = attn.k_proj.weight.detach()
    h_kv = wk.shape[0] // d
    wk = wk.reshape(h_kv, d, D).transpose(1, 2).repeat_interleave(H // h_kv, dim=0)
    return wq, wk
