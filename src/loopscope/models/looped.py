"""`LoopedLM`: a looped decoder-only transformer `(p, k⊗l, c)` in one file, read top to bottom.

    RMSNorm → RoPE → Attention → SwiGLU MLP → Layer (pre / sandwich / ouro norms) → LoopedLM.

The recurrence loop is in `LoopedLM.forward`, in a few lines, with the injection and the inter-loop norm
where the equations of Blayney et al. (2026) §3.1 put them:

    e      = Prelude(γ·E[x])                      (γ = embed_scale)
    s_0    = e | 0 | TruncNormal(0, σ²)            (state_init)
    for t in 0..R-1:
        z_t    = s_t | s_t + e | W_I [s_t ; e]     (injection, once per recurrence, at the block start)
        s_{t+1} = B_k ∘ … ∘ B_1 (z_t)              (the block; Ouro norm: s_{t+1} ← n(s_{t+1}))
    logits = W_U · n_f(Coda(s_R))

A feedforward model is this class with R = 1. Every site goes through a `HookPoint` labelled with its
`Step(segment, recurrence, layer)`; the model itself never records anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopscope.errors import InputError
from loopscope.models.config import LoopedConfig
from loopscope.models.hooks import HookPoint, Step, name_hook_points


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · w, computed in float32 or wider (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_float32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(x32.dtype)).to(x.dtype)


def rope_inverse_frequencies(cfg: LoopedConfig) -> torch.Tensor:
    """θ_i = base^(-2i/d), optionally rescaled by Llama-3's piecewise rule (Meta, Llama 3.1 report).
    Computed in float64 and rounded, or in float32 throughout when `cfg.rope_fp32` (as published code does)."""
    d = cfg.head_size
    dtype = torch.float32 if cfg.rope_fp32 else torch.float64
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=dtype) / d))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen <= old / lo) & (wavelen >= old / hi)
        scaled = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        inv = scaled
    elif sc and sc.get("rope_type", sc.get("type", "default")) != "default":
        raise InputError(f"rope_scaling {sc} is not supported; use rope_type 'llama3' or none")
    return inv.float()


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) for positions [offset, offset + T)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.interleaved = cfg.rope_interleaved
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def forward(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """x: (B, T, H, d) → same shape, rotated."""
        T = x.shape[1]
        pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq)  # (T, d/2); the buffer moves with the model
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]  # (1, T, 1, d/2)
        xf = at_least_float32(x)
        cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


class KVCache:
    """Keys/values per (segment, recurrence, layer): every recurrence of a block layer has its own slot,
    as in Huginn's "full" cache and Ouro's `current_ut·N + layer` slots."""

    def __init__(self) -> None:
        self.slots: dict[Step, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seq_len = 0  # tokens already cached; advanced by the model after each forward

    def update(self, step: Step, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T, d) to the slot of `step` and return the whole slot."""
        if step in self.slots:
            k0, v0 = self.slots[step]
            k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        elif self.seq_len:
            raise InputError(
                f"KV cache has no slot for {step}: it was filled with fewer recurrences. "
                "Decode with the same `recurrences` as the prefill."
            )
        self.slots[step] = (k, v)
        return k, v


class Attention(nn.Module):
    """Causal multi-head attention with GQA: softmax(q kᵀ/√d + mask) v (Vaswani et al. 2017).

    The output always comes from the fused scaled_dot_product_attention kernel; the probabilities are
    materialised beside it (float32) only when someone listens at `hook_pattern`, so a captured run computes
    exactly the states and logits of an uncaptured one (tested bit for bit).
    """

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, H, d)) if cfg.qk_bias else None
        self.hook_pattern = HookPoint()  # (B, H, T, S) attention probabilities
        self.own_blocks = False  # see `own_token_jacobians`

    def forward(self, x: torch.Tensor, *, step: Step, rope: Rotary, offset: int, cache: KVCache | None):
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, d)  # (B, T, H, d)
        k = self.k_proj(x).view(B, T, Hkv, d)  # (B, T, Hkv, d)
        v = self.v_proj(x).view(B, T, Hkv, d)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]  # Huginn: a learned per-head offset
        q, k = rope(q, offset), rope(k, offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if cache is not None:
            k, v = cache.update(step, k, v)  # (B, Hkv, S, d), S = offset + T
        S = k.shape[2]
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, d)
        # query i (absolute position offset+i) may see keys 0..offset+i
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        if self.own_blocks:
            return self.o_proj(own_block_attention(q, k, v, causal).transpose(1, 2).reshape(B, T, H * d))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # the forward, with or without listeners
        if self.hook_pattern.active:
            # the probabilities are computed beside the fused kernel for whoever listens; the output stays the
            # kernel's, so capturing attention never changes the states. A hook that returns a different pattern
            # (an intervention on attention) makes the layer use that pattern instead.
            scores = (at_least_float32(q) @ at_least_float32(k).transpose(-1, -2)) / math.sqrt(d)  # (B, H, T, S)
            probs = scores.masked_fill_(~causal, float("-inf")).softmax(dim=-1)  # in place: scores is ours
            seen = self.hook_pattern(probs, step=step)
            if seen is not probs:
                y = (seen.to(v.dtype) @ v).to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, H * d)  # (B, T, H·d)
        return self.o_proj(y)


def own_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v, the same values, with gradients reaching token j's key and value only through
    query j: scores_ij = q_i·stop(k_j) for i ≠ j, q_j·k_j on the diagonal; out_i = Σ_j p_ij stop(v_j) + p_ii
    (v_i − stop(v_i)). Keys/values of the other tokens act as constants, so the Jacobian of the layer over the
    sequence is block diagonal, each block exactly ∂out_i/∂x_i with the others held fixed (no KV cache)."""
    d = q.shape[-1]
    if q.shape[-2] != k.shape[-2]:
        raise InputError("own-token Jacobians need the whole sequence in one forward (no KV cache)")
    kd, vd = k.detach(), v.detach()
    scores = at_least_float32(q) @ at_least_float32(kd).transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    own = (at_least_float32(q) * at_least_float32(k - kd)).sum(-1) / math.sqrt(d)  # 0 in value, the k_i gradient
    scores = scores + torch.diag_embed(own)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    out = probs @ at_least_float32(vd) + probs.diagonal(dim1=-2, dim2=-1)[..., None] * at_least_float32(v - vd)
    return out.to(v.dtype)


def own_token_jacobians(model: nn.Module):
    """A context in which every attention of `model` passes gradients to a token's key and value only from that
    token's own query (`own_block_attention`): one vector-Jacobian product of a map over the sequence then gives
    J_iiᵀ u_i for every token i at once, J_ii = ∂F(s)_i/∂s_i — the diagonal blocks of the causal Jacobian, exact,
    without a copy of the prefix per token. Values are unchanged; everything else in the layer acts per token.
    Needs no KV cache (the certificate's single forward)."""
    from contextlib import contextmanager

    @contextmanager
    def mode():
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for a in layers:
            a.own_blocks = True
        try:
            yield model
        finally:
            for a in layers:
                a.own_blocks = False

    return mode()


class SwiGLU(nn.Module):
    """MLP(x) = W_down (SiLU(W_gate x) ⊙ W_up x) (Shazeer 2020)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_post = HookPoint()  # (B, T, d_mlp) neuron activations

    def forward(self, x: torch.Tensor, *, step: Step) -> torch.Tensor:
        return self.down_proj(self.hook_post(F.silu(self.gate_proj(x)) * self.up_proj(x), step=step))


class Layer(nn.Module):
    """One transformer layer. The three norm placements (Blayney et al. §3.1, with norms n1..n4):

    pre      : x̂ = x + Attn(n1 x);          x' = x̂ + MLP(n3 x̂)
    sandwich : x̂ = n2(x + Attn(n1 x));      x' = n4(x̂ + MLP(n3 x̂))         (Huginn: norms on the stream)
    ouro     : x̂ = x + n2(Attn(n1 x));      x' = x̂ + n4(MLP(n3 x̂))         (Ouro: norms on sublayer outputs)
    """

    def __init__(self, cfg: LoopedConfig, segment: str, index: int) -> None:
        super().__init__()
        self.segment, self.index, self.kind = segment, index, cfg.norm
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)
        self.attn_norm_in = RMSNorm(cfg.d_model, cfg.norm_eps)  # n1
        self.mlp_norm_in = RMSNorm(cfg.d_model, cfg.norm_eps)  # n3
        if cfg.norm != "pre":
            self.attn_norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)  # n2
            self.mlp_norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)  # n4
        self.hook_attn_in = HookPoint()  # the attention's input n1(x) (B, T, D): the score function's argument
        self.hook_attn_out = HookPoint()  # what attention adds to the stream (B, T, D)
        self.hook_resid_mid = HookPoint()  # stream after the attention sublayer
        self.hook_mlp_out = HookPoint()  # what the MLP adds to the stream
        self.hook_resid_post = HookPoint()  # layer output X_{ℓ,t}

    def forward(self, x, *, step: Step, rope: Rotary, offset: int, cache: KVCache | None):
        w = self.attn.q_proj.weight.dtype  # sublayers compute in the weights' dtype; the stream keeps x's
        a = self.attn(self.hook_attn_in(self.attn_norm_in(x).to(w), step=step), step=step, rope=rope, offset=offset,
                      cache=cache)
        if self.kind == "ouro":
            a = self.attn_norm_out(a)
        x = x + self.hook_attn_out(a.to(x.dtype), step=step)
        if self.kind == "sandwich":
            x = self.attn_norm_out(x)
        x = self.hook_resid_mid(x, step=step)
        m = self.mlp(self.mlp_norm_in(x).to(w), step=step)
        if self.kind == "ouro":
            m = self.mlp_norm_out(m)
        x = x + self.hook_mlp_out(m.to(x.dtype), step=step)
        if self.kind == "sandwich":
            x = self.mlp_norm_out(x)
        return self.hook_resid_post(x, step=step)


# Every site a layer exposes, short name → hook point path inside the layer, in the order a forward reaches them.
LAYER_SITES = {"attn_in": "hook_attn_in", "pattern": "attn.hook_pattern", "attn_out": "hook_attn_out",
               "resid_mid": "hook_resid_mid", "mlp_post": "mlp.hook_post", "mlp_out": "hook_mlp_out",
               "resid_post": "hook_resid_post"}
# Sites of the model itself (once per forward, or once per recurrence).
MODEL_SITES = {"embed": "hook_embed", "injected": "hook_injected", "state": "hook_state",
               "exit_gate": "hook_exit_gate"}


class LoopedLM(nn.Module):
    """Looped decoder-only LM. `forward(input_ids, recurrences=R)` → logits (B, T, vocab)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.rope = Rotary(cfg)
        self.prelude = nn.ModuleList(Layer(cfg, "prelude", i) for i in range(cfg.n_prelude))
        self.core = nn.ModuleList(Layer(cfg, "core", j) for j in range(cfg.n_block))
        self.coda = nn.ModuleList(Layer(cfg, "coda", i) for i in range(cfg.n_coda))
        self.adapter = nn.Linear(2 * D, D, bias=False) if cfg.injection == "concat" else None  # W_I on [s; e]
        self.loop_norm = RMSNorm(D, cfg.norm_eps) if cfg.norm == "ouro" else None  # stream norm per recurrence
        self.exit_gate = nn.Linear(D, 1) if cfg.exit_gate else None
        self.final_norm = RMSNorm(D, cfg.norm_eps) if (cfg.final_norm or cfg.coda_input_norm) else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, cfg.vocab_size, bias=False)
        self.hook_embed = HookPoint()  # γ·E[x] (B, T, D)
        self.hook_injected = HookPoint()  # block input z_t after injection, once per recurrence
        self.hook_state = HookPoint()  # s_{t+1}: state handed to the next recurrence (after the loop norm)
        self.hook_exit_gate = HookPoint()  # Ouro exit-gate logit per token (B, T)
        self.hook_points = name_hook_points(self)
        # dtype of the residual stream and recurrent state; None = the weights'. `load_model` sets float32 for
        # low-precision weights unless asked otherwise, so that rounding does not fake convergence.
        self.stream_dtype: torch.dtype | None = None
        self.reset_parameters()

    # --- construction --------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded init: N(0, σ²) for matrices, σ/√(2·(p+k+c)) for output projections, ones for norms. Drawn by a
        generator on the parameters' device: a model built on the CPU (every loader, then moved) has the same weights
        everywhere; one built directly on an accelerator (`with torch.device("cuda")`, the GPU benchmark's 3.5 B
        parameters) draws them there, from that device's generator, in seconds instead of minutes."""
        device = next(self.parameters()).device
        if device.type == "meta":  # a loader's shape holder: its weights come from the checkpoint, not from here
            return
        gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)

    def site_points(self, site: str) -> list[HookPoint]:
        """The hook points of a site (see LAYER_SITES, MODEL_SITES): one per layer of every segment, or one."""
        if site in MODEL_SITES:
            return [self.hook_points[MODEL_SITES[site]]]
        if site not in LAYER_SITES:
            raise InputError(f"unknown site {site!r}; sites are {[*MODEL_SITES, *LAYER_SITES]}")
        return [self.hook_points[f"{seg}.{i}.{LAYER_SITES[site]}"]
                for seg in ("prelude", "core", "coda") for i in range(len(getattr(self, seg)))]

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U (vocab, D)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # --- the loop ------------------------------------------------------------------------------------
    def initial_state(self, e: torch.Tensor, offset: int, state_seed: int | None) -> torch.Tensor:
        """s_0 for the tokens at [offset, offset+T): the same values whether decoded at once or one by one."""
        kind = self.cfg.state_init
        if kind == "embedding":
            return e
        if kind == "zeros":
            return torch.zeros_like(e)
        B, T, D = e.shape
        seed = self.cfg.seed if state_seed is None else state_seed
        std = self.cfg.state_init_std
        gen = torch.Generator()
        s0 = torch.empty(T, B, D)
        for i in range(T):  # each position seeded by (seed, position): the draw never depends on T or chunking
            gen.manual_seed(seed * 1_000_003 + offset + i)
            nn.init.trunc_normal_(s0[i], std=std, a=-3 * std, b=3 * std, generator=gen)
        return s0.transpose(0, 1).to(e)

    def inject(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """z = s (none) | s + e (add) | W_I [s ; e] (concat, Huginn's adapter)."""
        if self.cfg.injection == "add":
            return s + e
        if self.cfg.injection == "concat":
            return self.adapter(torch.cat([s, e], dim=-1).to(self.adapter.weight.dtype)).to(s.dtype)
        return s

    def prelude_output(self, input_ids: torch.Tensor, offset: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """e = Prelude(γ·E[x]) (B, T, D), in the stream dtype: what the block is injected with."""
        x = self.embed(input_ids).to(self.stream_dtype or self.embed.weight.dtype)
        x = self.hook_embed(x * self.cfg.embed_scale, step=Step("embed", 0, 0))
        for i, layer in enumerate(self.prelude):
            x = layer(x, step=Step("prelude", 0, i), rope=self.rope, offset=offset, cache=cache)
        return x

    def block_map(self, s: torch.Tensor, e: torch.Tensor, recurrence: int = 0, offset: int = 0,
                  cache: KVCache | None = None) -> torch.Tensor:
        """One recurrence, s_{t+1} = F(s_t; e): injection, the K block layers, the Ouro stream norm. The map whose
        fixed points and Jacobian the dynamics study; `forward` applies it R times."""
        s = self.hook_injected(self.inject(s, e), step=Step("core", recurrence, 0))
        for j, layer in enumerate(self.core):
            s = layer(s, step=Step("core", recurrence, j), rope=self.rope, offset=offset, cache=cache)
        if self.loop_norm is not None:
            s = self.loop_norm(s)
        return self.hook_state(s, step=Step("core", recurrence, self.cfg.n_block - 1))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        recurrences: int | None = None,
        initial_state: torch.Tensor | None = None,
        state_seed: int | None = None,
        cache: KVCache | None = None,
        backprop_recurrences: int | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) → logits (B, T, vocab). R = `recurrences` (default: the config's).

        `backprop_recurrences=k` (training only) runs the first R − k recurrences without gradients: truncated
        backpropagation through the last k, as Huginn and retrofitted models are trained (Geiping et al. 2025)."""
        cfg = self.cfg
        R = cfg.recurrences if recurrences is None else recurrence_count(recurrences)
        check_inputs(input_ids, R, cfg, offset=cache.seq_len if cache else 0)
        offset = cache.seq_len if cache is not None else 0

        w = self.embed.weight.dtype
        e = self.prelude_output(input_ids, offset, cache)
        s = initial_state.to(e) if initial_state is not None else self.initial_state(e, offset, state_seed)
        no_grad = 0 if backprop_recurrences is None else max(R - int(backprop_recurrences), 0)
        for t in range(R):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= no_grad):
                s = self.block_map(s, e, t, offset, cache)
                if self.exit_gate is not None:
                    gate = self.exit_gate(s.to(w)).squeeze(-1)
                    self.hook_exit_gate(gate, step=Step("core", t, cfg.n_block - 1))
        logits = self.readout(s, offset, cache)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return logits

    def readout(self, s: torch.Tensor, offset: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Final state s_R (B, T, D) → logits (B, T, vocab): the coda input norm, the coda, the final norm, W_U."""
        x = self.final_norm(s) if self.cfg.coda_input_norm else s
        for i, layer in enumerate(self.coda):
            x = layer(x, step=Step("coda", 0, i), rope=self.rope, offset=offset, cache=cache)
        if self.cfg.final_norm:
            x = self.final_norm(x)
        return F.linear(x.to(self.embed.weight.dtype), self.unembedding)


# The largest recurrence count any command accepts. The paper's longest runs are R = 128 (analysis) and 8× the
# training R (extrapolation); 100,000 recurrences of the smallest model take hours on a CPU, so a larger count is
# almost surely a typo (`-r 1000000000` sat at "0/1 batch" for ten minutes before this bound).
MAX_RECURRENCES = 100_000


def recurrence_count(value, what: str = "recurrences") -> int:
    """`value` as a recurrence count: a whole number in 1..MAX_RECURRENCES, else one clear error (2.5 is refused,
    never truncated to 2)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise InputError(f"{what}={value!r}: give a whole number of recurrences (e.g. 64)")
    value = int(value)
    if value < 1:
        raise InputError(f"{what}={value}: a looped model needs at least 1 recurrence")
    if value > MAX_RECURRENCES:
        raise InputError(f"{what}={value}: give 1..{MAX_RECURRENCES:,} recurrences (the paper uses 128)")
    return value


def check_inputs(input_ids: torch.Tensor, recurrences: int, cfg: LoopedConfig, offset: int = 0) -> None:
    """Refuse inputs the model cannot run, naming the fix."""
    if recurrences < 1:
        raise InputError(f"recurrences={recurrences}: a looped model needs at least 1 recurrence")
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise InputError("input_ids is empty: give at least one prompt with at least one token")
    if offset + input_ids.shape[1] > cfg.max_seq_len:
        raise InputError(
            f"sequence of {offset + input_ids.shape[1]} tokens exceeds the model's context of "
            f"{cfg.max_seq_len}; shorten the prompt or use a model with a longer max_seq_len"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(
            f"token id {hi if hi >= cfg.vocab_size else lo} is outside the vocabulary [0, {cfg.vocab_size}); "
            "was the prompt tokenized with this model's tokenizer?"
        )
