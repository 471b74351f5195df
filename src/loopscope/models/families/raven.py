"""The Raven checkpoint format (Geiping et al. 2025's `raven_modeling_minimal.py`) that Huginn-0125 and the
retrofitted-recurrence checkpoints (McLeish et al. 2025) share: the config fields both read, the tensor names, and
which of the two a Raven checkpoint is. `huginn.py` and `retrofit.py` both build on this module, never on each
other."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loopscope.errors import CheckpointError
from loopscope.models.config import LoopedConfig
from loopscope.models.families.common import Link, model_type, read_config, require, weight_names

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


RETROFIT_CONFIG_KEYS = ("rope_theta", "max_position_embeddings")  # set by the converter, never by Huginn


def is_retrofit(path: Path) -> bool:
    """A Raven-format checkpoint made by the retrofit converter (see the module docstring)."""
    if model_type(path) != MODEL_TYPE:
        return False
    return retrofit_config_or_names(read_config(path), lambda: weight_names(path))


def retrofit_config_or_names(pub: dict, names) -> bool:
    """Whether a Raven-format config (and, if the config does not say, its tensor names: `names()`) is the retrofit
    converter's: it sets keys Huginn never does, and its sandwich layers have no third norm."""
    if any(k in pub for k in RETROFIT_CONFIG_KEYS):
        return True
    return not any(name.endswith(".norm_3.weight") for name in names())
