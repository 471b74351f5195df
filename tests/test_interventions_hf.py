"""Interventions on Hugging Face feedforward models: the same specs, checked against rebuilt models."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import build_tiny, gsm8k_questions, renumbered, smollm2, tiny_config

from loopscope.capture import capture, encode_prompts
from loopscope.errors import InputError
from loopscope.interventions import DeleteLayer, SwapLayers, ZeroSublayer, intervene, next_token_kl, summarize_kl
from loopscope.models import hf_parts

IDS = torch.tensor([[1, 17, 300, 4, 99, 23, 8, 512], [5, 5, 60, 700, 12, 3, 1, 2]])
PREFIX = {"llama": "model.layers.", "qwen2": "model.layers.", "olmo2": "model.layers.", "gpt2": "transformer.h."}



def rebuilt(kind: str, model, order: list[int]):
    """An independent model of len(order) layers holding the weights of the original layers `order`
    (Qwen2: each layer keeps its own attention type, full or sliding)."""
    from transformers import AutoModelForCausalLM

    changes = {}
    if kind == "qwen2":
        changes["layer_types"] = [model.config.layer_types[i] for i in order]
    cfg = tiny_config(kind, n_layers=len(order), **changes)
    other = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    other.load_state_dict(renumbered(model.state_dict(), PREFIX[kind], order), strict=True)
    return other


def same(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "olmo2"])
@pytest.mark.parametrize("layer", [0, 2])
def test_delete_layer_equals_model_built_without_it(kind, layer):
    model = build_tiny(kind)
    other = rebuilt(kind, model, [i for i in range(4) if i != layer])
    expected = capture(other, IDS, attention=True)
    with intervene(model, [DeleteLayer("core", layer)]):
        got = capture(model, IDS, attention=True)
    assert got.block_size == 3 and got.metadata["n_layers"] == 3
    for name in ("core", "core_attention", "embed", "logits"):
        assert same(getattr(got, name), getattr(expected, name)) == 0.0, name
    assert same(got.logits, capture(model, IDS).logits) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_swap_layers_equals_model_with_swapped_weights(kind):
    model = build_tiny(kind)  # qwen2: layer 1 full attention, layer 2 sliding window
    expected = capture(rebuilt(kind, model, [0, 2, 1, 3]), IDS, attention=True)
    with intervene(model, [SwapLayers("core", 1)]):
        got = capture(model, IDS, attention=True)
    for name in ("core", "core_attention", "logits"):
        assert same(getattr(got, name), getattr(expected, name)) == 0.0, name
    assert same(got.logits, capture(model, IDS).logits) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zeroing_hf_sublayers(kind):
    model = build_tiny(kind)
    base = capture(model, IDS, attention=True)
    with intervene(model, [ZeroSublayer("core", 1, "mlp", recurrences=[])]):
        assert torch.equal(capture(model, IDS, attention=True).core, base.core)
    with intervene(model, [ZeroSublayer("core", 2, "mlp")]):
        mlp = capture(model, IDS, attention=True)
    assert torch.equal(mlp.core[0, :2], base.core[0, :2])  # earlier layers untouched
    assert torch.equal(mlp.core_attention[0, 2], base.core_attention[0, 2])  # attention runs before the MLP
    assert all(same(mlp.core[0, j], base.core[0, j]) > 1e-3 for j in (2, 3))
    both = [ZeroSublayer("core", 2, s, recurrences=[0]) for s in ("attn", "mlp")]
    with intervene(model, both):  # pre-norm: x' = x + Attn + MLP → x' = x exactly
        ident = capture(model, IDS, attention=True)
    assert torch.equal(ident.core[0, 2], ident.core[0, 1])
    assert torch.equal(ident.core_attention[0, 2], base.core_attention[0, 2])  # probabilities still recorded


def test_hf_context_manager_restores_and_refuses_bad_specs():
    model = build_tiny("qwen2")
    before = capture(model, IDS, attention=True)
    layers, types = hf_parts.hf_layers(model), list(model.config.layer_types)
    with intervene(model, [DeleteLayer("core", 0), SwapLayers("core", 1), ZeroSublayer("core", 0, "attn")]):
        assert model.config.use_cache is False and len(hf_parts.hf_layers(model)) == 3
        assert model.config.layer_types == [types[1], types[3], types[2]]
    assert hf_parts.hf_layers(model) is layers and model.config.layer_types == types and model.config.use_cache
    assert all(not m._forward_hooks for m in model.modules())
    after = capture(model, IDS, attention=True)
    assert torch.equal(after.core, before.core) and torch.equal(after.logits, before.logits)
    with pytest.raises(InputError, match="only the 'core' segment"):
        with intervene(model, [DeleteLayer("prelude", 0)]):
            pass
    with pytest.raises(InputError, match="runs once"):
        with intervene(model, [ZeroSublayer("core", 0, "mlp", recurrences=[1])]):
            pass
    assert hf_parts.hf_layers(model) is layers


@pytest.mark.slow
def test_smollm2_first_layer_matters_more_than_a_middle_one():
    """Lad et al. 2024: deleting the first layer is catastrophic, a middle layer barely matters (SmolLM2, GSM8K)."""
    loaded = smollm2()
    ids, mask, tokens = encode_prompts(loaded.tokenizer, gsm8k_questions(1), loaded.max_seq_len)
    base = capture(loaded.model, ids, mask=mask)
    summaries = {}
    for layer in (0, 15):
        with intervene(loaded.model, [DeleteLayer("core", layer)]):
            changed = capture(loaded.model, ids, mask=mask)
        summaries[layer] = summarize_kl(next_token_kl(base, changed)).iloc[0]
    print({k: v[["mean_kl", "top1_agreement"]].round(3).to_dict() for k, v in summaries.items()})
    assert summaries[0]["mean_kl"] > 10 * summaries[15]["mean_kl"] > 0
    assert summaries[15]["top1_agreement"] > 0.5 > summaries[0]["top1_agreement"]
    assert len(hf_parts.hf_layers(loaded.model)) == 30
