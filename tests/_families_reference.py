"""Independent re-derivations of the three published looped families, for the family tests.

Written straight from the published equations (see loopscope.models.families.* docstrings for the sources),
working on the PUBLISHED tensor names and layouts (fused Wqkv / fc, qk_bias (2,1,H,d), ...), with their own
RMSNorm, RoPE (rotate-half via explicit cos/sin; adjacent pairs via complex multiplication), attention and MLP.
Nothing here imports loopscope's model code. Also: writers of tiny format-faithful checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def ids(B=2, T=10, seed=1):
    """Seeded token ids for the tiny family checkpoints (vocabulary 1024)."""
    return torch.randint(0, 1024, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- primitives --------------------------------------------------------------------------------------


def rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_rotate_half(x, theta):
    """x (B, T, H, d): HF Llama convention, pairs (i, i + d/2)."""
    T, d = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_adjacent(x, theta):
    """x (B, T, H, d): Huginn convention, pairs (2i, 2i+1) rotated as complex numbers."""
    T, d = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)[None, :, None]  # (1, T, 1, d/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape)


def attention(q, k, v):
    """q (B,T,H,d), k/v (B,T,Hkv,d) → output (B,T,H·d), probs (B,H,T,T). Explicit softmax, causal."""
    B, T, H, d = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    y = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * d)
    return y, probs


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


# ---- Ouro --------------------------------------------------------------------------------------------


def ouro_forward(W, c, ids, R):
    """Per recurrence t: pre-norm state, h_t = norm(...), gate g_t, logits_t; attention probs per (t, layer)."""
    N, H, Hkv, d, eps, theta = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["head_dim"], c["rms_norm_eps"], c["rope_theta"]
    W = {k: v.float() for k, v in W.items()}
    h = W["model.embed_tokens.weight"][ids]
    B, T, _ = h.shape
    out = {"pre": [], "h": [], "gate": [], "logits": [], "probs": {}}
    for t in range(R):
        for i in range(N):
            p = f"model.layers.{i}."
            x = rms(h, W[p + "input_layernorm.weight"], eps)
            q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, d)
            k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, d)
            v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, d)
            y, probs = attention(rope_rotate_half(q, theta), rope_rotate_half(k, theta), v)
            out["probs"][(t, i)] = probs
            h = h + rms(y @ W[p + "self_attn.o_proj.weight"].T, W[p + "input_layernorm_2.weight"], eps)
            m = swiglu(rms(h, W[p + "post_attention_layernorm.weight"], eps), W[p + "mlp.gate_proj.weight"],
                       W[p + "mlp.up_proj.weight"], W[p + "mlp.down_proj.weight"])
            h = h + rms(m, W[p + "post_attention_layernorm_2.weight"], eps)
        out["pre"].append(h)
        h = rms(h, W["model.norm.weight"], eps)
        out["h"].append(h)
        out["gate"].append((h @ W["model.early_exit_gate.weight"].T + W["model.early_exit_gate.bias"]).squeeze(-1))
        out["logits"].append(h @ W["lm_head.weight"].T)
    return out


# ---- Raven format (Huginn, retrofit) ------------------------------------------------------------------


def raven_block(W, p, x, c, style, probs_out=None):
    D, H = c["n_embd"], c["n_heads"]
    Hkv = c.get("num_key_value_heads", H)
    d, eps = D // H, c["norm_eps"]
    B, T, _ = x.shape
    qkv = rms(x, W[p + "norm_1.weight"], eps) @ W[p + "attn.Wqkv.weight"].T
    q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    q, k, v = q.reshape(B, T, H, d), k.reshape(B, T, Hkv, d), v.reshape(B, T, Hkv, d)
    if c.get("qk_bias"):
        q, k = q + W[p + "attn.qk_bias"][0, 0], k + W[p + "attn.qk_bias"][1, 0]
    if style == "huginn":
        q, k = rope_adjacent(q, c["rope_base"]), rope_adjacent(k, c["rope_base"])
    else:
        q, k = rope_rotate_half(q, c["rope_theta"]), rope_rotate_half(k, c["rope_theta"])
    y, probs = attention(q, k, v)
    if probs_out is not None:
        probs_out.append(probs)
    a = y @ W[p + "attn.proj.weight"].T
    gate, up = W[p + "mlp.fc.weight"].chunk(2, dim=0)
    if style == "huginn":
        x = rms(x + a, W[p + "norm_2.weight"], eps)
        return rms(x + swiglu(rms(x, W[p + "norm_3.weight"], eps), gate, up, W[p + "mlp.proj.weight"]),
                   W[p + "norm_4.weight"], eps)
    x = x + a
    return x + swiglu(rms(x, W[p + "norm_2.weight"], eps), gate, up, W[p + "mlp.proj.weight"])


def raven_forward(W, c, ids, R, s0=None, style="huginn", bypass=False):
    """Prelude outputs, injected block inputs z_t, core states per (t, j), coda outputs, logits, attention."""
    W = {k: v.float() for k, v in W.items()}
    gamma = c["init_values"]["embed_scale"]
    out = {"prelude": [], "injected": [], "core": [], "coda": [], "probs": {}}
    x = W["transformer.wte.weight"][ids] * gamma
    for i in range(c["n_layers_in_prelude"]):
        probs = []
        x = raven_block(W, f"transformer.prelude.{i}.", x, c, style, probs)
        out["prelude"].append(x)
        out["probs"][("prelude", 0, i)] = probs[0]
    e = x
    s = e if bypass else s0
    for t in range(R):
        z = s if bypass else torch.cat([s, e], -1) @ W["transformer.adapter.weight"].T
        out["injected"].append(z)
        s, row = z, []
        for j in range(c["n_layers_in_recurrent_block"]):
            probs = []
            s = raven_block(W, f"transformer.core_block.{j}.", s, c, style, probs)
            row.append(s)
            out["probs"][("core", t, j)] = probs[0]
        out["core"].append(row)
    x = rms(s, W["transformer.ln_f.weight"], c["norm_eps"]) if style == "huginn" else s
    for i in range(c["n_layers_in_coda"]):
        probs = []
        x = raven_block(W, f"transformer.coda.{i}.", x, c, style, probs)
        out["coda"].append(x)
        out["probs"][("coda", 0, i)] = probs[0]
    x = rms(x, W["transformer.ln_f.weight"], c["norm_eps"])
    head = W["transformer.wte.weight"] if c["tie_embeddings"] else W["lm_head.weight"]
    out["logits"] = x @ head.T
    return out


# ---- tiny checkpoint writers ---------------------------------------------------------------------------

V, D, H, F, BLOCK = 1024, 32, 4, 48, 64  # vocab = the bundled tokenizer's 1024 tokens


def _tokenizer(path: Path) -> None:
    from loopscope.data.tokenizer import load_tokenizer

    load_tokenizer().save_pretrained(str(path))


def _rand(gen, *shape, std=0.15):
    return torch.randn(*shape, generator=gen) * std


def _norm(gen, n=D):
    return 1 + 0.2 * torch.randn(n, generator=gen)


def write_ouro(path: Path, n_layers=2, kv_heads=4, seed=0, dtype=torch.bfloat16, tied=False):
    gen = torch.Generator().manual_seed(seed)
    d = D // H
    W = {"model.embed_tokens.weight": _rand(gen, V, D, std=1.0)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        W |= {p + "self_attn.q_proj.weight": _rand(gen, H * d, D),
              p + "self_attn.k_proj.weight": _rand(gen, kv_heads * d, D),
              p + "self_attn.v_proj.weight": _rand(gen, kv_heads * d, D),
              p + "self_attn.o_proj.weight": _rand(gen, D, H * d),
              p + "mlp.gate_proj.weight": _rand(gen, F, D), p + "mlp.up_proj.weight": _rand(gen, F, D),
              p + "mlp.down_proj.weight": _rand(gen, D, F),
              p + "input_layernorm.weight": _norm(gen), p + "input_layernorm_2.weight": _norm(gen),
              p + "post_attention_layernorm.weight": _norm(gen), p + "post_attention_layernorm_2.weight": _norm(gen)}
    W |= {"model.norm.weight": _norm(gen), "model.early_exit_gate.weight": _rand(gen, 1, D),
          "model.early_exit_gate.bias": _rand(gen, 1)}
    if not tied:
        W["lm_head.weight"] = _rand(gen, V, D)
    W = {k: v.to(dtype) for k, v in W.items()}
    c = {
        "architectures": ["OuroForCausalLM"], "model_type": "ouro",
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
        "hidden_size": D, "intermediate_size": F, "num_hidden_layers": n_layers, "num_attention_heads": H,
        "num_key_value_heads": kv_heads, "head_dim": d, "hidden_act": "silu", "max_position_embeddings": BLOCK,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": tied,
        "total_ut_steps": 4, "early_exit_threshold": 1.0, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": n_layers, "layer_types": ["full_attention"] * n_layers, "vocab_size": V,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16", "attention_dropout": 0.0,
    }
    return _write(path, W, c)


def raven_config(n_pre, n_core, n_coda, *, retrofit=False, kv_heads=H, mean_recurrence=32, block_size=BLOCK):
    sigma = math.sqrt(2 / (5 * D))
    c = {
        "architectures": ["RavenForCausalLM"], "model_type": "huginn_raven",
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "n_embd": D, "n_heads": H, "n_layers": n_pre + n_core + n_coda, "block_size": block_size, "vocab_size": V,
        "padded_vocab_size": V, "padding_multiple": 4096,
        "tie_embeddings": not retrofit, "tie_word_embeddings": not retrofit,
        "intermediate_size": F, "bias": False, "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6,
        "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "like-init", "injection_type": "linear", "n_layers_in_recurrent_block": n_core,
        "mean_recurrence": mean_recurrence, "sampling_scheme": "poisson-lognormal-filling", "mean_backprop_depth": 8,
        "n_layers_in_prelude": n_pre, "n_layers_in_coda": n_coda, "qk_bias": not retrofit,
        "activation_checkpoint_impl": "per-iteration", "rope_base": 50000, "torch_dtype": "float32",
        "transformers_version": "4.44.2", "num_key_value_heads": kv_heads, "num_attention_heads": H, "head_dim": D // H,
        "effective_expected_depth": n_pre + n_coda + n_core * mean_recurrence,
        "init_values": {"std": sigma, "out_proj": sigma, "embedding": sigma,
                        "embed_scale": 1.0 if retrofit else math.sqrt(D)},
        "test_time_noise": 0, "test_time_noise_type": "fixed", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    if retrofit:  # what convert_llama.get_llama_huginn_config overrides
        c |= {"norm_eps": 1e-5, "rope_base": 500000.0, "rope_theta": 10000.0, "max_position_embeddings": block_size}
    return c


def raven_weights(c, seed=0, retrofit=False):
    gen = torch.Generator().manual_seed(seed)
    d, Hkv = D // H, c["num_key_value_heads"]
    W = {"transformer.wte.weight": _rand(gen, V, D, std=0.3 if not retrofit else 1.0)}
    for seg, n in (("prelude", c["n_layers_in_prelude"]), ("core_block", c["n_layers_in_recurrent_block"]),
                   ("coda", c["n_layers_in_coda"])):
        for i in range(n):
            p = f"transformer.{seg}.{i}."
            W |= {p + "attn.Wqkv.weight": _rand(gen, (H + 2 * Hkv) * d, D), p + "attn.proj.weight": _rand(gen, D, D),
                  p + "mlp.fc.weight": _rand(gen, 2 * F, D), p + "mlp.proj.weight": _rand(gen, D, F),
                  p + "norm_1.weight": _norm(gen), p + "norm_2.weight": _norm(gen)}
            if not retrofit:
                W |= {p + "attn.qk_bias": _rand(gen, 2, 1, H, d), p + "norm_3.weight": _norm(gen),
                      p + "norm_4.weight": _norm(gen)}
    W |= {"transformer.adapter.weight": _rand(gen, D, 2 * D, std=0.15), "transformer.ln_f.weight": _norm(gen)}
    if not c["tie_embeddings"]:
        W["lm_head.weight"] = _rand(gen, V, D)
    return W


def huginn_freqs_cis(c):
    """The published model's persistent RoPE buffer: (1, block_size, 1, d/2, 2) = [cos, sin]."""
    d = c["n_embd"] // c["n_heads"]
    inv = 1.0 / (c["rope_base"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(c["block_size"], dtype=torch.float32), inv)
    return torch.stack([ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]], dim=4)


def write_huginn(path: Path, n_pre=1, n_core=2, n_coda=1, seed=0, freqs_cis=True, block_size=BLOCK):
    """block_size: the context (the published 4096; 64 here unless a test needs long system prompts)."""
    c = raven_config(n_pre, n_core, n_coda, block_size=block_size)
    W = raven_weights(c, seed)
    if freqs_cis:
        W["freqs_cis"] = huginn_freqs_cis(c)
    return _write(path, W, c)


def write_retrofit(path: Path, n_pre=1, n_core=2, n_coda=1, kv_heads=2, seed=0):
    c = raven_config(n_pre, n_core, n_coda, retrofit=True, kv_heads=kv_heads, mean_recurrence=4)
    return _write(path, raven_weights(c, seed, retrofit=True), c)


def _write(path: Path, W, c):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in W.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))
    _tokenizer(path)
    return path, W, c
