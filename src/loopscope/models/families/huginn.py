"""Huginn-0125 (Geiping et al. 2025, arXiv 2502.05171; `tomg-group-umd/huginn-0125`), loaded natively.

Published architecture (facts from `seal-rg/recurrent-pretraining: recpre/raven_modeling_minimal.py` and
`raven_config_minimal.py`, `model_type: "huginn_raven"`), written in LoopedLM's terms:

    e_0 = γ·wte[x]                         γ = init_values["embed_scale"] (= √n_embd)
    e   = prelude(e_0)                     SandwichBlocks
    s_0 ~ TruncNormal(0, σ²) on [−3σ, 3σ] · γ,  σ = init_values["std"] (= √(2/(5·n_embd)))
    s_{t+1} = core_block( adapter([s_t ; e]) )           adapter: Linear(2h → h, bias=False)
    logits = lm_head( ln_f( coda( ln_f(s_R) ) ) )         ln_f used twice, same weights

SandwichBlock: x = norm_2(x + Attn(norm_1 x)); x = norm_4(x + MLP(norm_3 x)) — LoopedLM's norm="sandwich".
Attention: fused `Wqkv` (q, k, v along the output dim), `qk_bias` (2, 1, H, d) added to q and k per head
BEFORE the rotary embedding, which rotates adjacent pairs (2i, 2i+1) (`apply_rotary_emb_complex_like`).
MLP: fused `fc` = [gate; up] along the output dim, y = proj(SiLU(gate x) ⊙ up x).

The start state is drawn from the same distribution with loopscope's seeded, per-position generator
(`LoopedLM.initial_state`; the seed is recorded in the Trajectory metadata); the published file draws from
torch's global RNG, so individual draws differ but their law is the same. `state_init="zeros"` gives the
published `init_scale=0` behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loopscope.errors import CheckpointError
from loopscope.models.config import LoopedConfig
from loopscope.models.families.common import (
    Family,
    Link,
    load_published,
    model_type,
    require,
    tied_copy_extra,
)
from loopscope.models.load import LoadedModel, register_loader
from loopscope.models.looped import rope_inverse_frequencies

MODEL_TYPE = "huginn_raven"
RAVEN_SEGMENTS = (("prelude", "prelude"), ("core_block", "core"), ("coda", "coda"))  # published ↔ LoopedLM
# What `raven_modeling_minimal.py` hard-codes, whatever these provenance keys say: refuse other values.
RAVEN_FIXED = (
    ("architecture_class_name", ("RecurrentGPT",)),
    ("block_class_name", ("SandwichBlock",)),
    ("norm_class_name", ("RMSNorm_llama",)),
    ("mlp_class_name", ("GatedMLP",)),
    ("nonlin_name", ("SiLU",)),
    ("injection_type", ("linear",)),
    ("bias", (False,)),
    ("test_time_noise", (0, 0.0)),
)


def raven_base(pub: dict[str, Any], path: Path) -> dict[str, Any]:
    """LoopedConfig fields common to every Raven-format checkpoint (Huginn and retrofitted recurrence).

    Keys: n_embd, n_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size/padded_vocab_size,
    n_layers_in_prelude, n_layers_in_recurrent_block, n_layers_in_coda, mean_recurrence, norm_eps, qk_bias,
    tie_embeddings, init_values {std, embed_scale}; defaults are RavenConfig's."""
    src = str(path)
    for key, allowed in RAVEN_FIXED:
        require(pub, key, allowed, src)
    D = int(pub.get("n_embd", pub.get("hidden_size", 5280)))
    H = int(pub.get("n_heads", pub.get("num_attention_heads", 55)))
    if D % H:
        raise CheckpointError(f"{src}: n_embd={D} is not divisible by n_heads={H}; the Raven format needs it")
    d = D // H  # the published attention uses n_embd // n_heads whatever head_dim says
    if pub.get("head_dim") not in (None, d):
        raise CheckpointError(f"{src}: head_dim={pub['head_dim']} but the Raven format uses n_embd // n_heads = {d}")
    init = pub.get("init_values") or {}
    gamma = float(init.get("embed_scale", math.sqrt(D)))
    sigma = float(init.get("std", math.sqrt(2 / (5 * D))))
    return dict(
        vocab_size=int(pub.get("padded_vocab_size") or pub.get("vocab_size", 65536)),
        d_model=D,
        n_heads=H,
        n_kv_heads=int(pub.get("num_key_value_heads") or H),
        head_dim=d,
        d_mlp=int(pub.get("intermediate_size", 17920)),
        n_prelude=int(pub.get("n_layers_in_prelude", 2)),
        n_block=int(pub.get("n_layers_in_recurrent_block", 4)),
        n_coda=int(pub.get("n_layers_in_coda", 2)),
        recurrences=int(pub.get("mean_recurrence", 32)),
        injection="concat",
        state_init="random",
        state_init_std=sigma * gamma,  # TruncNormal(0, σ²)[±3σ]·γ  ==  TruncNormal(0, (σγ)²)[±3σγ]
        norm_eps=float(pub.get("norm_eps", 1e-6)),
        embed_scale=gamma,
        qkv_bias=False,
        qk_bias=bool(pub.get("qk_bias", True)),
        tie_embeddings=bool(pub.get("tie_embeddings", True)),
        final_norm=True,
        name=path.name,
    )


def huginn_config(pub: dict[str, Any], path: Path) -> LoopedConfig:
    """Published Huginn config.json → LoopedConfig: sandwich norms, ln_f before and after the coda,
    adjacent-pair RoPE with base `rope_base`, context `block_size`."""
    fields = raven_base(pub, path)
    return LoopedConfig(
        **fields,
        max_seq_len=int(pub.get("block_size", 4096)),
        rope_base=float(pub.get("rope_base", 50000.0)),
        rope_interleaved=True,
        rope_fp32=True,  # precompute_freqs_cis works in float32
        norm="sandwich",
        coda_input_norm=True,
        extra={"family": "huginn", "source": str(path),
               "published": {k: pub[k] for k in ("mean_recurrence", "state_init", "injection_type") if k in pub}},
    )


def raven_links(cfg: LoopedConfig, norms: dict[str, str]) -> list[Link]:
    """Raven-format tensor names ↔ LoopedLM names; `norms` maps norm_k → the LoopedLM norm it is."""
    D, V, F_, d = cfg.d_model, cfg.vocab_size, cfg.d_mlp, cfg.head_size
    H, Hkv = cfg.n_heads, cfg.kv_heads
    counts = {"prelude": cfg.n_prelude, "core": cfg.n_block, "coda": cfg.n_coda}
    links = [Link("transformer.wte.weight", ("embed.weight",), (V, D))]
    for published, ours in RAVEN_SEGMENTS:
        for i in range(counts[ours]):
            p, q = f"transformer.{published}.{i}", f"{ours}.{i}"
            links += [
                Link(f"{p}.attn.Wqkv.weight",
                     (f"{q}.attn.q_proj.weight", f"{q}.attn.k_proj.weight", f"{q}.attn.v_proj.weight"),
                     ((H + 2 * Hkv) * d, D)),
                Link(f"{p}.attn.proj.weight", (f"{q}.attn.o_proj.weight",), (D, H * d)),
                Link(f"{p}.mlp.fc.weight", (f"{q}.mlp.gate_proj.weight", f"{q}.mlp.up_proj.weight"), (2 * F_, D)),
                Link(f"{p}.mlp.proj.weight", (f"{q}.mlp.down_proj.weight",), (D, F_)),
            ]
            if cfg.qk_bias:
                links.append(Link(f"{p}.attn.qk_bias", (f"{q}.attn.qk_bias",), (2, 1, H, d)))
            links += [Link(f"{p}.{norm}.weight", (f"{q}.{mine}.weight",), (D,)) for norm, mine in norms.items()]
    if cfg.injection == "concat":
        links.append(Link("transformer.adapter.weight", ("adapter.weight",), (D, 2 * D)))
    links.append(Link("transformer.ln_f.weight", ("final_norm.weight",), (D,)))
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",), (V, D)))
    return links


HUGINN_NORMS = {"norm_1": "attn_norm_in", "norm_2": "attn_norm_out", "norm_3": "mlp_norm_in", "norm_4": "mlp_norm_out"}


def huginn_links(cfg: LoopedConfig) -> list[Link]:
    return raven_links(cfg, HUGINN_NORMS)


def huginn_extras(cfg: LoopedConfig, found: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Accept `freqs_cis` (the published model's persistent RoPE buffer, (1, block_size, 1, d/2, 2) = [cos, sin])
    only if it holds the rotary angles this config implies, and a stored copy of the tied head."""
    accepted = tied_copy_extra(cfg, found, source, "lm_head.weight", "transformer.wte.weight")
    if "freqs_cis" in found:
        f = found["freqs_cis"]
        half = cfg.head_size // 2
        if f.ndim != 5 or f.shape[0] != 1 or f.shape[2] != 1 or f.shape[3] != half or f.shape[4] != 2:
            raise CheckpointError(f"{source}: freqs_cis has shape {tuple(f.shape)}; expected (1, T, 1, {half}, 2)")
        pos = torch.arange(f.shape[1], dtype=torch.float32)
        ang = torch.outer(pos, rope_inverse_frequencies(cfg))  # (T, d/2)
        want = torch.stack([ang.cos(), ang.sin()], dim=-1)[None, :, None]
        err = (f.float() - want).abs().max().item()
        if err > 2e-2:  # bf16 storage and fp32 angles up to ~4096 rad differ by < 1e-2
            raise CheckpointError(
                f"{source}: freqs_cis differs from the rotary angles of rope_base={cfg.rope_base}, head size "
                f"{cfg.head_size} by {err:.3g}; config.json does not match these weights"
            )
        accepted.append("freqs_cis")
    return accepted


HUGINN = Family("huginn", huginn_config, huginn_links, huginn_extras)


def recognises(path: Path) -> bool:
    from loopscope.models.families.retrofit import is_retrofit

    return model_type(path) == MODEL_TYPE and not is_retrofit(path)


def load_huginn(path: str | Path, overrides: Mapping[str, Any] | None = None,
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a published Huginn checkpoint directory; `overrides={"state_init": "zeros"}` starts from s_0 = 0."""
    return load_published(path, HUGINN, overrides, dtype)


register_loader("huginn", recognises, load_huginn)
