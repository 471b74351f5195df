"""Ouro / LoopLM (Zhu et al. 2025, arXiv 2510.25741; `ByteDance/Ouro-1.4B`, `Ouro-2.6B`), loaded natively.

Published architecture (facts from the released `modeling_ouro.py`, `model_type: "ouro"`): the whole stack of
N layers is the looped block (no prelude, no coda, no injection, s_0 = E[x], no embedding scale). Each layer is

    h ← h + input_layernorm_2( Attn( input_layernorm(h) ) )
    h ← h + post_attention_layernorm_2( MLP( post_attention_layernorm(h) ) )

and after every recurrence t the final norm is applied and fed back: h_t = model.norm(L_N ∘ … ∘ L_1(h_{t-1})).
The exit gate reads g_t = early_exit_gate(h_t) (Linear D→1 with bias); per-step logits are lm_head(h_t).
This is `LoopedConfig(norm="ouro", n_prelude=0, n_coda=0, final_norm=False, exit_gate=True)`; `loop_norm` is
`model.norm`. The recurrence count is the common `recurrences=R` argument (the checkpoint's `total_ut_steps`
is only the default): there is no init-time attribute to forget to reset.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loopscope.errors import CheckpointError
from loopscope.models.config import LoopedConfig
from loopscope.models.families.common import (
    Family,
    Link,
    load_published,
    model_type,
    require,
    rope_scaling,
    rope_theta,
    tied_copy_extra,
)
from loopscope.models.load import LoadedModel, register_loader
from loopscope.models.looped import LoopedLM

MODEL_TYPE = "ouro"


def ouro_config(pub: dict[str, Any], path: Path) -> LoopedConfig:
    """Published Ouro config.json → LoopedConfig (keys: hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, vocab_size, max_position_embeddings, rope_theta,
    rope_scaling, rms_norm_eps, tie_word_embeddings, total_ut_steps, hidden_act, use_sliding_window, layer_types)."""
    src = str(path)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in pub]
    if missing:
        raise CheckpointError(f"{src}: Ouro config.json lacks {missing}; is this the published config.json?")
    require(pub, "hidden_act", ("silu",), src)
    layer_types = pub.get("layer_types") or []
    if pub.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise CheckpointError(
            f"{src}: config.json enables sliding-window attention (use_sliding_window / layer_types); "
            "loopscope implements Ouro with full causal attention only, as the released checkpoints use"
        )
    D, H = int(pub["hidden_size"]), int(pub["num_attention_heads"])
    return LoopedConfig(
        vocab_size=int(pub["vocab_size"]),
        d_model=D,
        n_heads=H,
        n_kv_heads=int(pub.get("num_key_value_heads") or H),
        head_dim=int(pub.get("head_dim") or D // H),
        d_mlp=int(pub["intermediate_size"]),
        max_seq_len=int(pub.get("max_position_embeddings", 65536)),
        rope_base=rope_theta(pub, "rope_theta", default=10000.0),
        rope_interleaved=False,  # rotate_half: pairs (i, i + d/2)
        rope_fp32=True,  # inverse frequencies in float32, as transformers computes them
        rope_scaling=rope_scaling(pub),
        n_prelude=0,
        n_block=int(pub["num_hidden_layers"]),
        n_coda=0,
        recurrences=int(pub.get("total_ut_steps") or 4),
        norm="ouro",
        injection="none",
        state_init="embedding",
        norm_eps=float(pub.get("rms_norm_eps", 1e-6)),
        embed_scale=1.0,
        qkv_bias=False,
        qk_bias=False,
        tie_embeddings=bool(pub.get("tie_word_embeddings", False)),
        final_norm=False,
        coda_input_norm=False,
        exit_gate=True,
        name=path.name,
        extra={"family": "ouro", "source": src,
               "published": {k: pub[k] for k in ("total_ut_steps", "early_exit_threshold", "model_type") if k in pub}},
    )


def ouro_links(cfg: LoopedConfig) -> list[Link]:
    """Published Ouro tensor names (HF `OuroForCausalLM` state_dict) ↔ LoopedLM names."""
    D, V, F_, d = cfg.d_model, cfg.vocab_size, cfg.d_mlp, cfg.head_size
    H, Hkv = cfg.n_heads, cfg.kv_heads
    links = [Link("model.embed_tokens.weight", ("embed.weight",), (V, D))]
    for i in range(cfg.n_block):
        p, q = f"model.layers.{i}", f"core.{i}"
        links += [
            Link(f"{p}.self_attn.q_proj.weight", (f"{q}.attn.q_proj.weight",), (H * d, D)),
            Link(f"{p}.self_attn.k_proj.weight", (f"{q}.attn.k_proj.weight",), (Hkv * d, D)),
            Link(f"{p}.self_attn.v_proj.weight", (f"{q}.attn.v_proj.weight",), (Hkv * d, D)),
            Link(f"{p}.self_attn.o_proj.weight", (f"{q}.attn.o_proj.weight",), (D, H * d)),
            Link(f"{p}.mlp.gate_proj.weight", (f"{q}.mlp.gate_proj.weight",), (F_, D)),
            Link(f"{p}.mlp.up_proj.weight", (f"{q}.mlp.up_proj.weight",), (F_, D)),
            Link(f"{p}.mlp.down_proj.weight", (f"{q}.mlp.down_proj.weight",), (D, F_)),
            Link(f"{p}.input_layernorm.weight", (f"{q}.attn_norm_in.weight",), (D,)),  # n1
            Link(f"{p}.input_layernorm_2.weight", (f"{q}.attn_norm_out.weight",), (D,)),  # n2 (on Attn output)
            Link(f"{p}.post_attention_layernorm.weight", (f"{q}.mlp_norm_in.weight",), (D,)),  # n3
            Link(f"{p}.post_attention_layernorm_2.weight", (f"{q}.mlp_norm_out.weight",), (D,)),  # n4 (on MLP out)
        ]
    links += [
        Link("model.norm.weight", ("loop_norm.weight",), (D,)),  # applied after every recurrence
        Link("model.early_exit_gate.weight", ("exit_gate.weight",), (1, D)),
        Link("model.early_exit_gate.bias", ("exit_gate.bias",), (1,)),
    ]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",), (V, D)))
    return links


def ouro_extras(cfg: LoopedConfig, found: Mapping[str, torch.Tensor], source: str) -> list[str]:
    return tied_copy_extra(cfg, found, source, "lm_head.weight", "model.embed_tokens.weight")


OURO = Family("ouro", ouro_config, ouro_links, ouro_extras)


def recognises(path: Path) -> bool:
    return model_type(path) == MODEL_TYPE


def load_ouro(path: str | Path, overrides: Mapping[str, Any] | None = None,
              dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a published Ouro checkpoint directory (config.json, *.safetensors, tokenizer files)."""
    return load_published(path, OURO, overrides, dtype)


# --- Ouro's per-recurrence readouts ------------------------------------------------------------------
@torch.no_grad()
def step_logits(model: LoopedLM, input_ids: torch.Tensor, recurrences: int | None = None) -> torch.Tensor:
    """Per-recurrence logits [R, B, T, V]: logits_t = W_U · h_t with h_t the state after recurrence t's norm
    (`hook_state`), i.e. Ouro's `lm_head(hidden_states_list[t])` (Zhu et al. 2025, §3; `OuroForCausalLM`).
    The last row equals the model's final logits. For a Trajectory: W_U · loop_norm(traj.core[t, K-1])."""
    states: dict[int, torch.Tensor] = {}

    def keep(module, args, kwargs, output):
        states[kwargs["step"].recurrence] = output.detach()

    handle = model.hook_state.register_forward_hook(keep, with_kwargs=True)
    try:
        model(input_ids, recurrences=recurrences)
    finally:
        handle.remove()
    return torch.stack([F.linear(states[t], model.unembedding) for t in sorted(states)])


def exit_probabilities(gate_logits: torch.Tensor) -> torch.Tensor:
    """Ouro's exit distribution over recurrences from the gate logits g [R, ...] (e.g. `Trajectory.exit_gate`):
    λ_t = σ(g_t); p_t = λ_t ∏_{j<t} (1 − λ_j) for t < R−1, and the last step takes the rest,
    p_{R−1} = ∏_{j<R−1} (1 − λ_j), so Σ_t p_t = 1
    (Zhu et al. 2025, eq. for the exit distribution; `OuroForCausalLM.forward`, `stacked_exit_pdf`)."""
    lam = torch.sigmoid(gate_logits.float())
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)  # ∏_{j<t}(1-λ_j)
    p = lam * survive
    p[-1] = survive[-1]
    return p


register_loader("ouro", recognises, load_ouro)
