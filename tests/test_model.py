"""LoopedLM against the equations, computed independently here with plain tensor ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _decoding import decode_in_steps
from conftest import ARCH_KINDS, build, tiny_config

from loopscope.errors import CheckpointError, InputError
from loopscope.models import KVCache, LoopedLM


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_half(x, base):  # x (B, T, H, d), Llama "rotate half" convention
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2).double() / d)
    ang = torch.outer(torch.arange(x.shape[1]).double(), inv).float()
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def ref_attention(layer, x, cfg):
    a = layer.attn
    B, T, _ = x.shape
    H, Hkv, d = cfg.n_heads, cfg.kv_heads, cfg.head_size
    q = rope_half((x @ a.q_proj.weight.T).view(B, T, H, d), cfg.rope_base)
    k = rope_half((x @ a.k_proj.weight.T).view(B, T, Hkv, d), cfg.rope_base)
    v = (x @ a.v_proj.weight.T).view(B, T, Hkv, d)
    out = torch.zeros(B, T, H, d)
    for h in range(H):
        g = h // (H // Hkv)  # query head h reads kv head g
        s = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / math.sqrt(d)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out[:, :, h] = s.softmax(-1) @ v[:, :, g]
    return out.reshape(B, T, H * d) @ a.o_proj.weight.T


def ref_layer(layer, x, cfg):
    eps = cfg.norm_eps
    def mlp(h):
        m = layer.mlp
        return (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    n = lambda mod, h: rms(h, mod.weight, eps)  # noqa: E731
    if cfg.norm == "pre":
        x = x + ref_attention(layer, n(layer.attn_norm_in, x), cfg)
        return x + mlp(n(layer.mlp_norm_in, x))
    if cfg.norm == "sandwich":
        x = n(layer.attn_norm_out, x + ref_attention(layer, n(layer.attn_norm_in, x), cfg))
        return n(layer.mlp_norm_out, x + mlp(n(layer.mlp_norm_in, x)))
    x = x + n(layer.attn_norm_out, ref_attention(layer, n(layer.attn_norm_in, x), cfg))
    return x + n(layer.mlp_norm_out, mlp(n(layer.mlp_norm_in, x)))


def ref_forward(model: LoopedLM, ids, R, s0=None):
    """The (p, k⊗R, c) recurrence of Blayney et al. §3.1, written out; returns logits and every block state."""
    cfg = model.cfg
    x = model.embed.weight[ids] * cfg.embed_scale
    for layer in model.prelude:
        x = ref_layer(layer, x, cfg)
    e = x
    s = {"embedding": e, "zeros": torch.zeros_like(e)}.get(cfg.state_init, s0)
    states = []
    for _ in range(R):
        if cfg.injection == "add":
            s = s + e
        elif cfg.injection == "concat":
            s = torch.cat([s, e], -1) @ model.adapter.weight.T
        row = []
        for layer in model.core:
            s = ref_layer(layer, s, cfg)
            row.append(s)
        if cfg.norm == "ouro":
            s = rms(s, model.loop_norm.weight, cfg.norm_eps)
        states.append(torch.stack(row))
    x = s
    for layer in model.coda:
        x = ref_layer(layer, x, cfg)
    x = rms(x, model.final_norm.weight, cfg.norm_eps)
    return x @ model.unembedding.T, torch.stack(states)


def randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))


@pytest.mark.parametrize("kind", ARCH_KINDS, ids=lambda k: "-".join(k.values()))
def test_forward_matches_equations(kind, token_ids):
    model = build(**kind)
    randomise_norms(model)  # norms at 1 would hide a misplaced norm weight
    from loopscope.capture import capture

    traj = capture(model, token_ids, recurrences=4)
    s0 = model.initial_state(traj.prelude[-1], 0, None) if kind["state_init"] == "random" else None
    logits, states = ref_forward(model, token_ids, 4, s0)
    torch.testing.assert_close(traj.core, states, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(traj.logits, logits, atol=2e-5, rtol=1e-4)


def test_norm_kinds_differ(token_ids):
    """The three norm placements are different functions (a knob that did nothing would pass the test above)."""
    outs = [build(norm=n)(token_ids) for n in ("pre", "sandwich", "ouro")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_gqa_and_sdpa_path_equal_explicit(token_ids):
    model = build(n_kv_heads=2, norm="pre")
    from loopscope.capture import capture

    plain = model(token_ids, recurrences=3)  # fused SDPA: nothing listens at hook_pattern
    traj = capture(model, token_ids, recurrences=3, attention=True)  # explicit softmax
    torch.testing.assert_close(plain, traj.logits, atol=2e-5, rtol=1e-4)
    logits, _ = ref_forward(model, token_ids, 3)
    torch.testing.assert_close(plain, logits, atol=2e-5, rtol=1e-4)
    rows = traj.core_attention.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert traj.core_attention[..., 0, 1:].abs().max() == 0  # causal: the first token sees only itself


def test_feedforward_is_one_recurrence_same_class(token_ids):
    model = build(recurrences=1)
    logits, states = ref_forward(model, token_ids, 1)
    torch.testing.assert_close(model(token_ids), logits, atol=2e-5, rtol=1e-4)
    assert states.shape[0] == 1


def test_recurrences_per_call_independent_of_config(token_ids):
    model = build(recurrences=2, injection="concat", state_init="zeros")
    out5 = model(token_ids, recurrences=5)
    torch.testing.assert_close(out5, ref_forward(model, token_ids, 5)[0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out5, model(token_ids))


def test_random_state_is_seeded_and_recorded(token_ids):
    from loopscope.capture import capture

    model = build(injection="concat", state_init="random")
    a = capture(model, token_ids, recurrences=2, state_seed=7)
    b = capture(model, token_ids, recurrences=2, state_seed=7)
    c = capture(model, token_ids, recurrences=2, state_seed=8)
    torch.testing.assert_close(a.core, b.core, atol=0, rtol=0)
    assert not torch.allclose(a.core, c.core)
    assert a.metadata["state_seed"] == 7


@pytest.mark.parametrize("kind", [dict(norm="sandwich", injection="concat", state_init="random"),
                                  dict(norm="ouro", injection="none", n_kv_heads=2, exit_gate=True)])
def test_kv_cached_decoding_equals_full_forward(kind, token_ids):
    model = build(**kind)
    full = model(token_ids, recurrences=3)
    torch.testing.assert_close(decode_in_steps(model, token_ids, 5, recurrences=3), full, atol=2e-5, rtol=1e-4)


def test_decoding_with_other_recurrences_is_refused(token_ids):
    model = build()
    cache = KVCache()
    model(token_ids[:, :4], recurrences=2, cache=cache)
    with pytest.raises(InputError, match="same `recurrences`"):
        model(token_ids[:, 4:5], recurrences=3, cache=cache)


def test_bad_inputs_have_clear_errors(token_ids):
    model = build()
    with pytest.raises(InputError, match="at least 1 recurrence"):
        model(token_ids, recurrences=0)
    with pytest.raises(InputError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(torch.full((1, 3), 97))


def test_config_refuses_inconsistent_knobs():
    with pytest.raises(CheckpointError, match="never sees the input"):
        tiny_config(injection="none", state_init="zeros")
    with pytest.raises(CheckpointError, match="norm='post'"):
        tiny_config(norm="post")
    with pytest.raises(CheckpointError, match="not divisible"):
        tiny_config(d_model=30, n_heads=4)


def test_config_json_roundtrip(tmp_path):
    cfg = tiny_config(norm="ouro", exit_gate=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cfg.to_json(tmp_path / "c.json")
    assert type(cfg).from_json(tmp_path / "c.json") == cfg
    assert cfg.signature == "(1, 3⊗3, 1)"
    assert tiny_config(injection="concat").signature == "(1, 3⊗3, 1)_I"
    assert cfg.realized_depth(10) == 1 + 30 + 1


def test_llama3_rope_scaling_rule():
    """Hand check of the Llama-3 rule: long wavelengths divided by `factor`, short kept, medium interpolated."""
    from loopscope.models.looped import rope_inverse_frequencies

    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    cfg = tiny_config(d_model=64, n_heads=1, rope_base=10000.0)
    plain = rope_inverse_frequencies(cfg).double()
    scaled = rope_inverse_frequencies(cfg.replace(rope_scaling=sc)).double()
    wavelen = 2 * math.pi / plain
    short, long_ = wavelen < 64 / 4, wavelen > 64 / 1
    torch.testing.assert_close(scaled[short], plain[short].float().double())
    torch.testing.assert_close(scaled[long_], (plain[long_] / 8).float().double())
    mid = ~short & ~long_
    smooth = (64 / wavelen[mid] - 1) / 3
    torch.testing.assert_close(scaled[mid], ((1 - smooth) * plain[mid] / 8 + smooth * plain[mid]).float().double())
