"""Healing (experiments.heal) on a tiny retrofit checkpoint the test writes itself, with a tiny GSM8K-shaped corpus
the test writes too (no shared data needed): the recurrence schedule, resume after a kill, the saved delta."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopscope.errors import CheckpointError, InputError
from loopscope.experiments.heal import HealSettings, heal, mean_recurrence_at, sample_recurrences
from loopscope.models.healed import load_healed


def write_gsm8k(directory, n_train=24, n_test=10):
    """GSM8K-shaped jsonl files (question/answer with the '#### n' line) of simple sums."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, start in (("train", n_train, 0), ("test", n_test, 1000)):
        rows = [{"question": f"Tom has {a} apples and buys {a + 3} more. How many apples does he have?",
                 "answer": f"He has {a} + {a + 3} = {2 * a + 3} apples.\n#### {2 * a + 3}"}
                for a in range(start, start + n)]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture
def tiny_heal(tmp_path):
    """A 4-layer Llama saved as a HF directory (safetensors + loopscope's tokenizer): the real `base_model` path
    (retrofit with prelude 0, core 1-2, coda 3) runs on it, and the delta records its model.safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loopscope.data.tokenizer import load_tokenizer

    source = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(source)
    load_tokenizer().save_pretrained(source)
    data = write_gsm8k(tmp_path / "gsm8k")
    settings = dict(source=str(source), prelude="0", core="1-2", coda="3", corpus="gsm8k", data=str(data), steps=6,
                    batch_size=2, seq_len=24, lr=3e-3, warmup_steps=1, eval_every=3, eval_recurrences=(1, 3),
                    checkpoint_every=2, mean_recurrence=3.0, backprop_depth=2, lora_rank=4, threads=1)
    return settings, source


def test_recurrence_schedule_is_the_published_curriculum():
    s = HealSettings(steps=100, mean_recurrence=8.0, curriculum=0.25, curriculum_start=2.0, backprop_depth=3)
    assert mean_recurrence_at(0, s) == 2.0 and mean_recurrence_at(25, s) == 8.0
    assert mean_recurrence_at(10, s) == pytest.approx(2.0 + 6.0 * 10 / 25)
    draws = [sample_recurrences(step, s) for step in range(30, 100)]
    assert draws == [sample_recurrences(step, s) for step in range(30, 100)]  # a pure function of (seed, step)
    r = np.array([d[0] for d in draws])
    assert (r >= 1).all() and all(k == min(3, rr) for rr, k in draws)
    # r = Poisson(λ) + 1 with E[λ] = μ: the mean of 70 draws near μ + 1 = 9 (sd of the mean ≈ 0.6)
    assert 7.0 < r.mean() < 11.0
    assert sample_recurrences(5, HealSettings(control=True)) == (1, 1)


def test_heal_resumes_after_a_kill_to_the_same_losses(tmp_path, tiny_heal):
    settings, _ = tiny_heal
    whole = heal(HealSettings(**settings), tmp_path / "whole", progress=False)
    assert heal(HealSettings(**settings), tmp_path / "killed", progress=False,
                simulate_kill_after=3) == {}  # dies after step 3; its last checkpoint is step 2
    resumed = heal(HealSettings(**settings), tmp_path / "killed", progress=False)
    assert resumed["steps"] == whole["steps"] == 6
    h1 = json.loads((tmp_path / "whole" / "checkpoint" / "state.json").read_text())["history"]
    h2 = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["history"]
    assert h1["recurrences"] == h2["recurrences"]
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    assert resumed["heldout"] == pytest.approx(whole["heldout"], rel=1e-5)
    assert whole["heldout"]["r3"] < whole["heldout_start"]["loss_r3"]  # lr 3e-3 on a tiny model: it learns


def test_changed_settings_refuse_to_resume(tmp_path, tiny_heal):
    settings, _ = tiny_heal
    heal(HealSettings(**settings), tmp_path / "run", progress=False, simulate_kill_after=2)
    with pytest.raises(InputError, match="other settings.*lr"):
        heal(HealSettings(**{**settings, "lr": 1e-3}), tmp_path / "run", progress=False)


def test_delta_rebuilds_the_healed_model_and_refuses_another_base(tmp_path, tiny_heal):
    """OUT/delta on the base = the trained model (logits to fp16 rounding of the delta); a modified base is
    refused by sha256 even at the same size."""
    settings, source = tiny_heal
    heal(HealSettings(**settings), tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "delta" / "delta.json").read_text())
    assert info["base"]["file"] == "model.safetensors" and info["split"]["core"] == "1-2"
    # rebuild by hand: base retrofit + full tensors + (α/r) B A, compared with the delta loader's merge
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "delta" / "delta.safetensors"))
    from safetensors.torch import load_file as load_base

    w0 = load_base(str(source / "model.safetensors"))["model.layers.2.self_attn.q_proj.weight"]  # core layer 1
    a, b = tensors["lowrank.core.1.attn.q_proj.lora_A"].float(), tensors["lowrank.core.1.attn.q_proj.lora_B"].float()
    want = w0 + (32.0 / a.shape[0]) * b @ a
    assert (b @ a).abs().max() > 0  # training moved the update off its zero init
    modified = tmp_path / "modified.safetensors"
    raw = bytearray((source / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    modified.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is not the base the delta"):
        load_healed(tmp_path / "run" / "delta", base_file=modified)
    healed = load_healed(tmp_path / "run" / "delta")  # the base found where the delta says
    torch.testing.assert_close(healed.model.state_dict()["core.1.attn.q_proj.weight"], want, rtol=0, atol=1e-6)
    assert healed.model.cfg.n_block == 2 and healed.model.cfg.recurrences == 3
    # the rebuilt model computes what the trained one did: held-out loss at R = 3 to fp16 rounding of the delta
    from loopscope.experiments.heal import encode_texts, heldout_texts, pooled_loss, text_losses

    texts = encode_texts(heldout_texts(settings["data"]), healed.tokenizer)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert pooled_loss(text_losses(healed.model, texts, 3)) == pytest.approx(m["heldout"]["r3"], abs=2e-3)


# The history of `tiny_heal` written by the code before the stability options existed (commit 8266297, one thread).
PUBLISHED_LOSSES = [6.919305801391602, 6.920003414154053, 6.929218769073486, 6.847968578338623, 6.869878768920898,
                    6.799414157867432]


def test_hutchinson_estimate_is_the_frobenius_norm_on_average():
    """E‖vᵀJ‖² = ‖J‖_F² for J the dense Jacobian of one recurrence of a tiny looped block (every token at once),
    within 4 standard errors of the mean of 400 draws; and the penalty is one draw divided by the state size."""
    from conftest import build

    from loopscope.experiments.heal import hutchinson_frobenius, jacobian_penalty

    model = build().double()
    e = model.prelude_output(torch.tensor([[5, 9, 2]]))
    state = torch.randn(e.shape, generator=torch.Generator().manual_seed(1), dtype=e.dtype) + e.detach()
    J = torch.autograd.functional.jacobian(lambda z: model.block_map(z, e.detach()), state).reshape(state.numel(), -1)
    frobenius = float(J.pow(2).sum())
    gen = torch.Generator().manual_seed(2)
    draws = np.array([float(hutchinson_frobenius(lambda z: model.block_map(z, e.detach()), state,
                                                 torch.randn(state.shape, generator=gen, dtype=state.dtype)).detach())
                      for _ in range(400)])
    assert abs(draws.mean() - frobenius) < 4 * draws.std(ddof=1) / np.sqrt(len(draws))
    assert draws.std() > 0.01 * frobenius  # a real estimate, not the exact value in disguise
    s = HealSettings(seed=3)
    v = torch.randn(state.shape, generator=torch.Generator().manual_seed(317_811 + 1_000_003 * 3 + 7)).to(state)
    one = hutchinson_frobenius(lambda z: model.block_map(z, e.detach()), state, v) / state.numel()
    assert float(jacobian_penalty(model, state, e, 7, s).detach()) == pytest.approx(float(one.detach()), rel=1e-9)


def test_hutchinson_power_estimates_the_frobenius_norm_of_the_matrix_power():
    """E‖vᵀJᵐ‖² = ‖Jᵐ‖_F² (m = 3, dense Jᵐ by matrix_power), within 4 standard errors of 400 draws; the penalty
    with jacobian_power m is (one draw / n)^(1/m)."""
    from conftest import build

    from loopscope.experiments.heal import hutchinson_frobenius, jacobian_penalty

    model = build().double()
    e = model.prelude_output(torch.tensor([[5, 9, 2]])).detach()
    state = torch.randn(e.shape, generator=torch.Generator().manual_seed(1), dtype=e.dtype) + e
    J = torch.autograd.functional.jacobian(lambda z: model.block_map(z, e), state).reshape(state.numel(), -1)
    frobenius = float(torch.linalg.matrix_power(J, 3).pow(2).sum())
    gen = torch.Generator().manual_seed(2)
    draws = np.array([float(hutchinson_frobenius(lambda z: model.block_map(z, e), state,
                                                 torch.randn(state.shape, generator=gen, dtype=state.dtype),
                                                 power=3).detach()) for _ in range(400)])
    assert abs(draws.mean() - frobenius) < 4 * draws.std(ddof=1) / np.sqrt(len(draws))
    v = torch.randn(state.shape, generator=torch.Generator().manual_seed(317_811 + 7)).to(state)
    one = float(hutchinson_frobenius(lambda z: model.block_map(z, e), state, v, 3).detach()) / state.numel()
    penalty = jacobian_penalty(model, state, e, 7, HealSettings(jacobian_power=3))
    assert float(penalty.detach()) == pytest.approx(one ** (1 / 3), rel=1e-9)


def test_adapter_state_scale_scales_the_block_jacobian_and_its_spectral_radius():
    """With W_s → α·W_s, the block map at s/α sees the same block input z as before at s, so its Jacobian is exactly
    α times the old one (dense Jacobians), and ρ with it; scaling the injection's columns instead fails this."""
    from conftest import build

    from loopscope.experiments.heal import scale_adapter_state

    model = build(injection="concat").double()
    e = model.prelude_output(torch.tensor([[5, 9, 2, 7]])).detach()
    state = torch.randn(e.shape, generator=torch.Generator().manual_seed(1), dtype=e.dtype) + e

    def jacobian(s):
        return torch.autograd.functional.jacobian(lambda z: model.block_map(z, e), s).reshape(s.numel(), -1)

    before = jacobian(state)
    alpha = 0.6
    scale_adapter_state(model, alpha)
    after = jacobian(state / alpha)
    torch.testing.assert_close(after, alpha * before, rtol=1e-10, atol=1e-12)
    rho = torch.linalg.eigvals(before).abs().max()
    assert float(torch.linalg.eigvals(after).abs().max()) == pytest.approx(alpha * float(rho), rel=1e-8)
    with pytest.raises(InputError, match="concat adapter"):
        scale_adapter_state(build(injection="add"), alpha)


def test_stability_options_off_give_the_published_steps(tmp_path, tiny_heal):
    """Defaults: the losses of the code before issue 22, step for step. The tapped path (long-horizon loss at
    weight 0, so its gradient is zero) changes no step either: the hooks only read."""
    settings, _ = tiny_heal
    for name, extra in (("off", {}), ("tapped", {"long_recurrence": 6, "long_weight": 0.0})):
        heal(HealSettings(**settings, **extra), tmp_path / name, progress=False)
        history = json.loads((tmp_path / name / "checkpoint" / "state.json").read_text())["history"]
        np.testing.assert_allclose(history["loss"], PUBLISHED_LOSSES, rtol=1e-6, err_msg=name)
    assert "loss_long" in history and all(r > 3 for r in history["recurrences_long"])


def test_stability_options_resume_after_a_kill(tmp_path, tiny_heal):
    """Penalty, long-horizon loss and ρ log on: a killed run resumes to the same losses and the same ρ log; the
    penalty and the long loss move the trajectory off the published one; ρ sits beside the loss in the CSVs."""
    import pandas as pd

    settings, _ = tiny_heal
    stable = {**settings, "jacobian_weight": 0.5, "long_recurrence": 8, "rho_every": 2, "rho_recurrence": 8}
    whole = heal(HealSettings(**stable), tmp_path / "whole", progress=False)
    assert heal(HealSettings(**stable), tmp_path / "killed", progress=False, simulate_kill_after=3) == {}
    resumed = heal(HealSettings(**stable), tmp_path / "killed", progress=False)
    m1, m2 = (json.loads((tmp_path / d / "checkpoint" / "state.json").read_text()) for d in ("whole", "killed"))
    for key in ("loss", "loss_long", "jacobian"):
        np.testing.assert_allclose(m1["history"][key], m2["history"][key], rtol=1e-5, err_msg=key)
    assert m1["history"]["recurrences_long"] == m2["history"]["recurrences_long"]
    assert [x["step"] for x in m1["rho"]] == [x["step"] for x in m2["rho"]] == [0, 2, 4, 6]
    np.testing.assert_allclose([x["rho"] for x in m1["rho"]], [x["rho"] for x in m2["rho"]], rtol=1e-5)
    assert resumed["rho"]["rho"] == pytest.approx(whole["rho"]["rho"], rel=1e-5)
    assert m1["history"]["loss"][0] == pytest.approx(PUBLISHED_LOSSES[0], rel=1e-6)  # the same first forward
    assert abs(m1["history"]["loss"][-1] - PUBLISHED_LOSSES[-1]) > 1e-4  # then other gradients, other steps
    history = pd.read_csv(tmp_path / "whole" / "history.csv")
    assert history["rho"].notna().tolist() == [False, True, False, True, False, True]
    evals = pd.read_csv(tmp_path / "whole" / "eval.csv")
    assert evals["step"].tolist() == [0, 2, 3, 4, 6] and evals["rho"].notna().sum() == 4
    assert (tmp_path / "whole" / "loss_curve.png").stat().st_size > 0
    with pytest.raises(InputError, match="other settings.*jacobian_weight"):
        heal(HealSettings(**{**stable, "jacobian_weight": 1.0}), tmp_path / "killed", progress=False)


def test_rho_log_is_the_certificate(tmp_path, tiny_heal):
    """The logged ρ at the start (float32, 24 Arnoldi steps) is the stability certificate's converged ρ (float64,
    40 steps) of the same text on the same (start) model, to 1e-3."""
    from loopscope.experiments.certificate import token_certificates
    from loopscope.experiments.heal import base_model, encode_texts, heldout_texts

    settings, _ = tiny_heal
    s = HealSettings(**{**settings, "steps": 1, "rho_every": 1, "rho_recurrence": 6})
    m = heal(s, tmp_path / "run", progress=False)
    model, tokenizer, _ = base_model(s)
    ids = encode_texts(heldout_texts(s.data), tokenizer)[0]
    frame = token_certificates(model, ids[None], 6, [ids.numel() - 1], steps=40)
    assert m["rho_start"]["rho_prefix"] == pytest.approx(float(frame["rho"].iloc[0]), rel=1e-3)
    assert m["rho_start"]["rho_own"] == pytest.approx(float(frame["rho_own"].iloc[0]), rel=1e-3)
    assert m["rho_start"]["rho"] == max(m["rho_start"]["rho_prefix"], m["rho_start"]["rho_own"])


def test_bad_layer_split_is_one_line_before_loading(tmp_path, capsys, tiny_heal, monkeypatch):
    """Overlapping segments, a layer named twice, a layer the source lacks: one line, and no weights read."""
    from conftest import run_cli

    import loopscope.models.families.retrofit as retrofit

    def no_loading(*args, **kwargs):
        raise AssertionError("the split must be checked before the source is loaded")

    monkeypatch.setattr(retrofit, "load_source_model", no_loading)
    _, source = tiny_heal
    capsys.readouterr()  # the fixture's progress bars
    for split, message in ((["--core", "1-2", "--coda", "2-3"], "layer 2 is named in both --core and --coda"),
                           (["--prelude", "0,0"], "layer 0 is named twice in --prelude"),
                           (["--core", "1-2", "--coda", "3-5"],
                            "layer indices [4, 5] are outside the source's 4 layers"),
                           (["--core", "2-1"], "is not N or A-B with A ≤ B")):
        args = ["heal", str(tmp_path / "o"), "--source", str(source), "--prelude", "0", "--coda", "3", *split]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (split, err)
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["heal", str(tmp_path / "o"), "--control", "--rho-every", "5"], capsys)
    assert code == 2 and "--rho-every acts on the loop" in err
    import typer

    from loopscope.cli.main import app

    data = next(p for p in typer.main.get_command(app).commands["heal"].params if p.name == "data")
    assert data.default is None and "default" not in data.help  # --help promises no default it does not apply


def test_cli_heal_reports_bad_input_in_one_line(tmp_path, capsys, tiny_heal):
    from conftest import run_cli

    _, source = tiny_heal
    code, _, err = run_cli(["heal", str(tmp_path / "o"), "--source", str(source), "--steps", "0"], capsys)
    assert code == 2 and "--steps 0 must be ≥ 1" in err and "Traceback" not in err
    code, _, err = run_cli(["heal", str(tmp_path / "o"), "--eval-recurrences", "1,x"], capsys)
    assert code == 2 and "'x' is not an integer" in err
