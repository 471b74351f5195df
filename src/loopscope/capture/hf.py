"""Capture of a Hugging Face feedforward causal LM (Llama family, GPT-2, SmolLM2): one forward → a `Trajectory`
with R = 1, the decoder layers as one pass of the "core", registered as the capture adapter for HF models. Lives in
`capture` because recording is capture's job; `models.hf_parts` only says where a HF model keeps its parts."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from loopscope.capture.record import register_capture_adapter
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.models.hf_parts import _get, hf_layers, hf_layout, is_hf_model


def _store(store: dict[int, torch.Tensor], index: int, what: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    if index in store:
        raise InputError(f"decoder layer {index} ran twice in one forward ({what}); capture records one forward")
    store[index] = value.detach().to(device="cpu", dtype=dtype)


def _layer_hook(store, index, dtype, module, args, output):
    _store(store, index, "output", output[0] if isinstance(output, tuple) else output, dtype)


def _attention_hook(store, index, dtype, module, args, output):
    probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if probs is None:
        raise InputError("the attention module returned no probabilities; load the model with "
                         "attn_implementation='eager' (loopscope's loader does)")
    _store(store, index, "attention", probs, dtype)


def _embed_hook(store, dtype, module, args, output):
    _store(store, 0, "embedding", output, dtype)


def check_hf_inputs(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse ids the model cannot run, naming the fix."""
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise InputError(f"input_ids must be a non-empty (batch, tokens) tensor; got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    V = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise InputError(f"token id {hi if hi >= V else lo} is outside the vocabulary [0, {V}); "
                         "was the prompt tokenized with this model's tokenizer?")
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    if n_ctx is not None and input_ids.shape[1] > n_ctx:
        raise InputError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's context of {n_ctx}; shorten it")


@torch.no_grad()
def capture_hf(
    model: nn.Module,
    input_ids: torch.Tensor,
    recurrences: int | None = None,
    attention: bool = False,
    *,
    mask: torch.Tensor | None = None,
    tokens: list[list[str]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Trajectory:
    """One forward of a HF causal LM → Trajectory with R = 1 (registered as the capture adapter).

    core [1, L, B, T, D]: raw output of decoder layer j (the last one *before* the final norm, unlike HF's
    hidden_states[-1]); embed [B, T, D] = HF hidden_states[0]; core_attention [1, L, B, H, T, T] (attention=True);
    logits [B, T, V]. Each hook is bound to one layer module and files under that module's position in the layer
    list, so labels never depend on call order. Runs without KV cache; `mask` is stored, not fed to the model:
    with right padding no real token attends to a pad (pads follow it), so real positions are exact.
    """
    if recurrences not in (None, 1):
        raise InputError(f"recurrences={recurrences}: a feedforward model runs once; use recurrences=1 or None")
    layout = hf_layout(model)
    check_hf_inputs(model, input_ids)
    if attention and model.config._attn_implementation != "eager":
        raise InputError(f"attention probabilities need attn_implementation='eager' (model uses "
                         f"{model.config._attn_implementation!r}); load it with loopscope.models.load_model")
    layers = list(hf_layers(model))
    states: dict[int, torch.Tensor] = {}
    patterns: dict[int, torch.Tensor] = {}
    embed: dict[int, torch.Tensor] = {}
    handles = [_get(model, layout.embed).register_forward_hook(partial(_embed_hook, embed, dtype))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(partial(_layer_hook, states, i, dtype)))
        if attention:
            attn = getattr(layer, layout.attn)
            handles.append(attn.register_forward_hook(partial(_attention_hook, patterns, i, dtype)))
    try:
        logits = model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False).logits.cpu()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in states]
    if missing:
        raise InputError(f"decoder layers {missing} did not run; the model's forward skipped them")
    core = torch.stack([states[i] for i in range(len(layers))])[None]  # [1, L, B, T, D]
    core_attention = torch.stack([patterns[i] for i in range(len(layers))])[None] if attention else None
    cfg = model.config
    name = getattr(model, "loopscope_name", None) or cfg.name_or_path
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    meta = {
        "model": {"name": name, "model_type": cfg.model_type, "n_prelude": 0, "n_block": len(layers), "n_coda": 0,
                  "recurrences": 1, "d_model": cfg.hidden_size, "n_heads": n_heads, "vocab_size": cfg.vocab_size},
        "model_name": name, "n_layers": len(layers), "feedforward": True, "recurrences": 1,
    }
    return Trajectory(core=core, embed=embed[0], core_attention=core_attention, logits=logits.detach().to(dtype),
                      token_ids=input_ids.detach().cpu(), tokens=tokens, mask=mask, metadata=meta)


register_capture_adapter(is_hf_model, capture_hf)
