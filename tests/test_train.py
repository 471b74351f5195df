"""Training from scratch: schedule, batches, overfitting, exact resume, safetensors-only checkpoints, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import GSM8K
from safetensors import safe_open

from loopscope.data.corpus import encode_documents, pack_sequences
from loopscope.data.tokenizer import load_tokenizer
from loopscope.errors import InputError
from loopscope.experiments.evaluate import greedy_generate
from loopscope.experiments.presets import preset_config
from loopscope.experiments.train import TrainData, TrainSettings, batch_rows, learning_rate, train
from loopscope.models import LoopedLM, load_model
from loopscope.models.checkpoint import read_safetensors


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_data(tokenizer) -> TrainData:
    """One GSM8K-style sentence repeated: a corpus a model can memorise in a few dozen steps."""
    text = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n#### 9"
    docs = encode_documents([text] * 40, tokenizer)
    rows = pack_sequences(docs, 32)
    return TrainData(train=rows, heldout=rows[:4], heldout_name="tiny", heldout_rows=[])


def micro(**kw) -> TrainSettings:
    base = dict(preset="micro", steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4,
                eval_sequences=4, checkpoint_every=4, accuracy_questions=0, threads=1)
    return TrainSettings(**{**base, **kw})


def test_learning_rate_schedule_by_hand():
    s = TrainSettings(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert learning_rate(0, 12, s) == 0.5 and learning_rate(1, 12, s) == 1.0  # warmup (step+1)/2
    assert learning_rate(2, 12, s) == pytest.approx(1.0)  # p = 0
    assert learning_rate(4, 12, s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)))  # p = 0.2
    assert learning_rate(12, 12, s) == pytest.approx(0.1)
    lin = TrainSettings(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="linear")
    assert learning_rate(4, 12, lin) == pytest.approx(0.82)  # 1 − 0.9·0.2


def test_batches_visit_every_row_once_per_epoch():
    seqs = torch.arange(12).view(12, 1)
    epoch0 = torch.cat([batch_rows(seqs, s, 4, seed=0)[0] for s in range(3)]).flatten().tolist()
    epoch1 = torch.cat([batch_rows(seqs, s, 4, seed=0)[0] for s in range(3, 6)]).flatten().tolist()
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1  # reshuffled each epoch
    assert batch_rows(seqs, 4, 4, seed=0)[1:] == (1, 1)  # (epoch, batch in epoch)
    assert torch.equal(batch_rows(seqs, 4, 4, seed=0)[0], batch_rows(seqs, 4, 4, seed=0)[0])


def test_presets_follow_the_paper_notation():
    assert preset_config("looped-4").signature == "(2, 4⊗4, 2)"
    assert preset_config("looped-12").realized_depth() == 2 + 12 * 4 + 2
    assert preset_config("looped-8+noprelude").signature == "(0, 8⊗4, 0)"
    cfg = preset_config("looped-4+inject+sandwich", seed=3)
    assert (cfg.signature, cfg.norm, cfg.injection, cfg.seed) == ("(2, 4⊗4, 2)_I", "sandwich", "concat", 3)
    ff = preset_config("feedforward-12")
    assert (ff.recurrences, ff.realized_depth(), ff.d_model, ff.norm) == (1, 12, 128, "pre")
    for bad in ("looped-5", "looped-4+wide"):
        with pytest.raises(InputError):
            preset_config(bad)


def test_loss_decreases_when_overfitting(tmp_path, tiny_data, tokenizer):
    m = train(micro(steps=40), tmp_path, data=tiny_data, tokenizer=tokenizer, progress=False)
    first, last = m["heldout_untrained"]["loss"], m["heldout"]["loss"]
    assert first == pytest.approx(math.log(1024), abs=0.05)  # untrained ≈ uniform over 1024 tokens
    assert last < 0.3 * first  # memorised: far below uniform
    history = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["history"]["loss"]
    assert len(history) == 40 and sum(history[-5:]) / 5 < 0.3 * sum(history[:5]) / 5


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_data, tokenizer):
    kw = dict(data=tiny_data, tokenizer=tokenizer, progress=False)
    one_go = train(micro(), tmp_path / "one", **kw)
    assert one_go["resumed_from_step"] is None and one_go["steps"] == 8
    reference = read_safetensors(tmp_path / "one" / "checkpoint" / "state.safetensors")
    ref_meta = json.loads((tmp_path / "one" / "checkpoint" / "state.json").read_text())
    # kill right after the step-4 checkpoint, and kill at step 6 (steps 5-6 lost, redone from step 4)
    for name, kill_after in (("at4", 4), ("at6", 6)):
        out = tmp_path / name
        assert train(micro(), out, simulate_kill_after=kill_after, **kw) == {}
        assert not (out / "model").exists()
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
        resumed = train(micro(), out, **kw)
        assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
        state = read_safetensors(out / "checkpoint" / "state.safetensors")
        assert state.keys() == reference.keys()
        for key in reference:  # model weights and AdamW moments
            torch.testing.assert_close(state[key], reference[key], rtol=0, atol=1e-6)
        meta = json.loads((out / "checkpoint" / "state.json").read_text())
        assert meta["history"]["loss"] == pytest.approx(ref_meta["history"]["loss"], abs=1e-6)
        assert [e["step"] for e in meta["evals"]] == [0, 4, 8]
        assert [e["loss"] for e in meta["evals"]] == pytest.approx([e["loss"] for e in ref_meta["evals"]], abs=1e-6)
        assert resumed["heldout"]["loss"] == pytest.approx(one_go["heldout"]["loss"], abs=1e-6)
    # a finished run is neither trained nor evaluated again (its metrics stand); different settings are refused
    again = train(micro(), tmp_path / "one", **kw)
    assert again == json.loads((tmp_path / "one" / "metrics.json").read_text()) and again["steps"] == 8
    assert again["heldout"]["loss"] == pytest.approx(one_go["heldout"]["loss"], abs=0)
    with pytest.raises(InputError, match="lr"):
        train(micro(lr=5e-3), tmp_path / "one", **kw)


def test_outputs_are_safetensors_and_json_only(tmp_path, tiny_data, tokenizer):
    m = train(micro(steps=4, save_dtype="float16"), tmp_path, data=tiny_data, tokenizer=tokenizer, progress=False)
    ckpt = tmp_path / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors"]
    with safe_open(str(ckpt / "state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys and "optimizer.embed.weight.exp_avg_sq" in keys
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["step"] == 4 and isinstance(meta["rng"]["torch"], list) and meta["data"]["epoch"] == 0
    for path in tmp_path.rglob("*"):  # no pickle / torch.save zip anywhere
        if path.is_file():
            head = path.read_bytes()[:4]
            assert head[:1] != b"\x80" and head != b"PK\x03\x04", path
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))
    loaded = load_model(tmp_path / "model")  # the saved model is what was trained, rounded to float16
    trained = read_safetensors(ckpt / "state.safetensors")
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, trained[f"model.{name}"].half().float(), rtol=0, atol=0)
    assert m["model_bytes"] == (tmp_path / "model" / "model.safetensors").stat().st_size


def test_greedy_generate_with_cache_matches_recomputing():
    torch.manual_seed(0)
    model = LoopedLM(preset_config("micro+inject", seed=1)).eval()
    prompt = [1, 44, 279, 322, 984]
    got = greedy_generate(model, prompt, max_new_tokens=6, stop_ids=set())
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # no cache: full forward each time
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert greedy_generate(model, prompt, 6, stop_ids={got[2]}) == got[:2]


@pytest.mark.usefixtures("real_gsm8k")  # the official files: fails loudly without them
def test_cli_trains_on_gsm8k_and_saves_a_loadable_model(tmp_path):
    from typer.testing import CliRunner

    from loopscope.cli.main import app

    out = tmp_path / "run"
    args = ["train", "--config", "micro", "--out", str(out), "--steps", "3", "--data", str(GSM8K),
            "--batch-size", "2", "--seq-len", "32", "--accuracy-questions", "1", "--threads", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_name"] == "gsm8k-test-256" and metrics["steps"] == 3
    assert metrics["heldout"]["tokens"] > 40_000  # the whole 256-question subset
    assert metrics["heldout_indices"][:3] == [0, 2, 3] and len(metrics["heldout_indices"]) == 256
    assert metrics["exact_match"]["n"] == 1
    loaded = load_model(out / "model")
    assert loaded.model.cfg.signature == "(1, 2⊗2, 1)" and len(loaded.tokenizer) == 1024
    bad = CliRunner().invoke(app, ["train", "--config", "micro", "--out", str(tmp_path / "x"), "--steps", "1"],
                             catch_exceptions=True)
    assert bad.exit_code != 0


def test_healing_continues_a_retrofit_and_saves_what_it_trained(tmp_path, tiny_data, tokenizer):
    """--from-retrofit starts from the checkpoint's weights (not a fresh init), trains them, resumes, and
    DIR/model reloads as the trained model."""
    from _families_reference import write_retrofit

    retro, _, _ = write_retrofit(tmp_path / "retro", n_pre=1, n_core=2, n_coda=1)
    start = load_model(retro)
    settings = dict(preset="micro", init_from=str(retro), steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                    eval_every=3, eval_sequences=4, checkpoint_every=3, accuracy_questions=0, threads=1,
                    heldout_sequences=2)
    kw = dict(data=tiny_data, tokenizer=start.tokenizer, progress=False)
    assert train(TrainSettings(**settings), tmp_path / "heal", simulate_kill_after=4, **kw) == {}
    m = train(TrainSettings(**settings), tmp_path / "heal", **kw)
    assert m["resumed_from_step"] == 3 and m["steps"] == 6 and m["preset"] == f"from {retro}"
    # step 0 is the retrofit itself: its held-out loss is the loaded model's, not a random init's
    ids = tiny_data.heldout[:2]  # heldout_sequences=2
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(start.model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert m["heldout_untrained"]["loss"] == pytest.approx(ref.item(), abs=1e-4)
    assert m["heldout"]["loss"] < m["heldout_untrained"]["loss"] - 0.5
    healed = load_model(tmp_path / "heal" / "model")
    assert healed.model.cfg.signature == start.model.cfg.signature
    state = read_safetensors(tmp_path / "heal" / "checkpoint" / "state.safetensors")
    for name, tensor in healed.model.state_dict().items():
        torch.testing.assert_close(tensor, state[f"model.{name}"], rtol=0, atol=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "ff")
    tokenizer.save_pretrained(tmp_path / "ff")
    with pytest.raises(InputError, match="cannot be trained"):
        train(TrainSettings(**{**settings, "init_from": str(tmp_path / "ff")}), tmp_path / "ff-run", **kw)


def test_a_time_cap_shorter_than_calibration_fixes_the_budget_and_finishes(tmp_path, tiny_data, tokenizer,
                                                                           monkeypatch):
    """`--minutes` running out before the step budget was calibrated (4 timed steps): the steps taken are the
    budget, the run is finished, and rerunning it returns its metrics without evaluating again."""
    import loopscope.experiments.train as train_module

    s = micro(steps=None, minutes=1e-4)  # 6 ms: one step
    metrics = train(s, tmp_path, data=tiny_data, tokenizer=tokenizer, progress=False)
    assert metrics["steps"] == metrics["total_steps"] == 1 and metrics["finished"] and metrics["time_cap_reached"]
    monkeypatch.setattr(train_module, "heldout_loss", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    again = train(micro(steps=None, minutes=1e-4), tmp_path, data=tiny_data, tokenizer=tokenizer, progress=False)
    assert again == json.loads((tmp_path / "metrics.json").read_text()) and again["steps"] == 1


def test_a_training_run_is_locked_and_keeps_its_finished_model(tmp_path, tiny_data, tokenizer):
    """`train` into a folder another run is writing is refused; a finished run's model and metrics stay for the
    resumed call that returns them; other settings are refused by name."""
    from loopscope.output import MANIFEST, claim_output

    kw = dict(data=tiny_data, tokenizer=tokenizer, progress=False)
    same = {k: getattr(micro(steps=2), k) for k in TrainSettings.TRAJECTORY_FIELDS}
    with claim_output(tmp_path, "train", same):  # another run of the same settings holds the folder
        with pytest.raises(InputError, match="another loopscope run"):
            train(micro(steps=2), tmp_path, **kw)
    first = train(micro(steps=2), tmp_path, **kw)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["command"] == "train" and "metrics.json" in manifest["files"]
    assert "model/model.safetensors" in manifest["files"] and not any("checkpoint" in f for f in manifest["files"])
    assert train(micro(steps=2), tmp_path, **kw) == first == json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(InputError, match=r"seed: 0 → 1"):
        train(micro(steps=2, seed=1), tmp_path, **kw)
