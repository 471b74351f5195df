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
    tied_copy_extra,
)
from loopscope.models.families.raven import MODEL_TYPE, is_retrofit, raven_base, raven_links
from loopscope.models.load import LoadedModel, register_loader
from loopscope.models.looped import rope_inverse_frequencies


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
    return model_type(path) == MODEL_TYPE and not is_retrofit(path)


def load_huginn(path: str | Path, overrides: Mapping[str, Any] | None = None,
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a published Huginn checkpoint directory; `overrides={"state_init": "zeros"}` starts from s_0 = 0."""
    return load_published(path, HUGINN, overrides, dtype)


register_loader("huginn", recognises, load_huginn)
