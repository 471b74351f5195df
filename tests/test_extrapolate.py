"""`loopscope extrapolate` and `loopscope conditions`: the slicing property they rest on, per-R numbers against
direct calls, behaviours of models whose dynamics are known, resume, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCH_KINDS, build

from loopscope.capture import capture
from loopscope.data.tokenizer import load_tokenizer
from loopscope.errors import InputError
from loopscope.experiments import extrapolate as ex
from loopscope.experiments.conditions import run_conditions
from loopscope.experiments.evaluate import heldout_loss
from loopscope.experiments.presets import preset_config
from loopscope.models import LoopedLM, load_model
from loopscope.models.checkpoint import save_model


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    """A `micro` preset checkpoint (d = 32, (1, 2⊗2, 1)) with the bundled tokenizer: loadable by path."""
    model = LoopedLM(preset_config("micro+inject", seed=3)).eval()
    return save_model(model, tmp_path_factory.mktemp("micro") / "model", load_tokenizer())


def settings(out: Path, model: Path, data: Path, **kw) -> ex.ExtrapolateSettings:
    base = dict(models=[str(model)], out=out, data=str(data), recurrences=[1, 2, 5], loss_questions=6,
                accuracy_questions=0, dynamics_prompts=2, progress=False)
    return ex.ExtrapolateSettings(**{**base, **kw})


@pytest.mark.parametrize("kind", ARCH_KINDS[::3] + [dict(norm="sandwich", injection="concat", state_init="random")])
def test_states_after_recurrence_t_do_not_depend_on_total_recurrences(kind, token_ids):
    model = build(**kind)
    short, long = capture(model, token_ids, recurrences=3), capture(model, token_ids, recurrences=7)
    assert torch.equal(long.core[:3], short.core)
    assert torch.equal(long.injected[:3], short.injected)
    assert torch.equal(ex.first_recurrences(long, 3).core, short.core)
    assert not torch.allclose(long.coda, short.coda)  # what runs after the loop does depend on R
    assert not torch.allclose(long.logits, short.logits)


def test_default_grid_reaches_eight_times_training_r():
    assert ex.recurrence_grid(4, 8) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert ex.recurrence_grid(2, 8) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert ex.recurrence_grid(5, 2) == [1, 2, 3, 4, 5, 6, 8, 10]


def zeroed_block(injection: str) -> LoopedLM:
    """A pre-norm model whose block adds nothing (attention and MLP outputs zeroed): the block is the identity."""
    model = build(norm="pre", injection=injection, state_init="embedding")
    with torch.no_grad():
        for layer in model.core:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_behaviours_of_models_with_known_dynamics(token_ids):
    # identity block: s_{t+1} = s_t, every token is at its fixed point from the first recurrence — with no motion at
    # all, below any rounding floor: at_floor
    still = capture(zeroed_block("none"), token_ids, recurrences=16)
    cols, per_prompt = ex.dynamics_columns(still, 8)
    assert per_prompt == [0.0] * token_ids.shape[0]
    assert cols["at_floor"] == 1.0 and cols["fixed_point_distance"] == 0.0 and cols["successive_change"] == 0.0
    # additive injection around an identity block: s_{t+1} = s_t + e, a straight drift at constant speed
    drift = capture(zeroed_block("add"), token_ids, recurrences=16)
    cols, per_prompt = ex.dynamics_columns(drift, 8)
    assert cols["slider"] == 1.0
    # every prompt's own mean change, whose token-weighted mean is the row's (equal-length prompts: the plain mean)
    assert len(per_prompt) == token_ids.shape[0] and min(per_prompt) > 0
    assert sum(per_prompt) / len(per_prompt) == pytest.approx(cols["successive_change"], rel=1e-6)
    # ‖s_t − s_15‖ / ‖s_15‖ with s_t = s_0 + t·e decreases towards 0 as t → 15
    dist = [ex.dynamics_columns(drift, R)[0]["fixed_point_distance"] for R in (1, 8, 16)]
    assert dist[0] > dist[1] > dist[2] == 0.0
    assert all(v != v for v in (ex.dynamics_columns(drift, 3)[0][b] for b in ("fixed_point", "orbit")))  # NaN for R < 4


def test_per_r_loss_equals_heldout_loss_at_that_r(tmp_path, micro_dir, gsm8k_dir):
    tables = ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, loss_questions=24))
    per_r = tables["per_r"].set_index("recurrences")
    assert list(per_r.index) == [1, 2, 5]
    assert set(per_r["trained_recurrences"]) == {2}
    loaded = load_model(str(micro_dir))
    heldout = ex.heldout_sequences(loaded, ex.gsm8k_test_subset(gsm8k_dir)[:24])
    assert heldout.shape[0] >= 2
    for R in (1, 2, 5):
        assert per_r.loc[R, "loss"] == pytest.approx(heldout_loss(loaded.model, heldout, recurrences=R)["loss"],
                                                     rel=1e-6)
    assert per_r["loss"].nunique() == 3  # R really changes the run
    # the units of the claims' intervals: one loss per held-out sequence, each that sequence's own loss
    texts = tables["per_text"].set_index(["recurrences", "text"])["loss"]
    assert len(texts) == 3 * heldout.shape[0]
    assert texts.loc[5].mean() == pytest.approx(per_r.loc[5, "loss"], rel=1e-9)
    assert texts.loc[(5, 1)] == pytest.approx(heldout_loss(loaded.model, heldout[1:2], recurrences=5)["loss"],
                                              rel=1e-6)
    prompts = tables["per_prompt"]
    assert set(prompts["recurrences"]) == {2, 5} and (prompts["successive_change"] > 0).all()  # none at R = 1
    assert per_r.loc[5, "fixed_point_distance"] == 0.0  # the largest R is its own reference
    assert per_r["alignment_corr"].isna().all()  # no control given
    assert (tmp_path / "index.html").exists() and (tmp_path / "figures" / "extrapolate_metrics.png").exists()


def test_interrupted_run_resumes_from_cached_rows(tmp_path, micro_dir, monkeypatch, gsm8k_dir):
    calls = []

    real = ex.sequence_losses

    def flaky(model, sequences, batch_size=16, recurrences=None):
        calls.append(recurrences)
        if recurrences == 5 and len(calls) == 3:
            raise KeyboardInterrupt  # as if the user stopped the run during R = 5
        return real(model, sequences, batch_size, recurrences)

    monkeypatch.setattr(ex, "sequence_losses", flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir))
    assert calls == [1, 2, 5]
    first = sorted(p.name for p in (tmp_path / "cache" / "extrapolate").glob("R*.json"))
    assert len(first) == 2
    tables = ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir))
    assert calls == [1, 2, 5, 5]  # only the unfinished R ran again
    assert list(tables["per_r"]["recurrences"]) == [1, 2, 5]
    assert set(tables["per_text"]["recurrences"]) == {1, 2, 5}  # the cached rows bring their units back
    with pytest.raises(InputError, match=r"other settings \(loss_questions: 6 → 7\).*--overwrite"):
        ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, loss_questions=7))  # never mixed with the old
    ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, loss_questions=7, overwrite=True))
    assert calls[4:] == [1, 2, 5]  # other settings: nothing reused


def test_condition_rows_are_fractions_of_the_same_question_tokens(tmp_path, micro_dir, gsm8k_dir):
    table = run_conditions(str(micro_dir), tmp_path, data=str(gsm8k_dir), questions=2, recurrences=8,
                           conditions=["none", "long-persona-padded"], progress=False)
    assert list(table.columns) == ["condition", "method", "reconstructed", "n", "fixed_point", "orbit",
                                   "slider", "divergent", "unknown", "at_floor", "non_fixed_low", "non_fixed_high"]
    non_fixed = 1 - table["fixed_point"] - table["at_floor"]  # at_floor: a fixed point as far as rounding tells
    assert ((table["non_fixed_low"] <= non_fixed + 1e-12) & (non_fixed <= table["non_fixed_high"] + 1e-12)).all()
    assert len(table) == 4 and set(table["method"]) == {"dynamics", "paper"}
    sums = table[["fixed_point", "orbit", "slider", "divergent", "unknown", "at_floor"]].sum(axis=1)
    assert sums.to_numpy() == pytest.approx(1.0)
    tokenizer = load_tokenizer()
    questions = [r["question"] for r in ex.gsm8k_test_subset(gsm8k_dir)[:2]]
    n_question = sum(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions)
    assert set(table["n"]) == {n_question}  # question tokens only, whatever precedes them
    every = table.attrs["all_tokens"].set_index(["condition", "method"])["n"]
    assert every[("long-persona-padded", "paper")] > every[("none", "paper")] == n_question + 2  # + BOS each
    assert (tmp_path / "figures" / "conditions_paper.png").exists()


def test_clear_errors(tmp_path, micro_dir, monkeypatch, gsm8k_dir):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the optional package
    with pytest.raises(InputError, match="--data"):
        ex.run_extrapolate(settings(tmp_path, micro_dir, None))
    with pytest.raises(InputError, match="--data"):
        run_conditions(str(micro_dir), tmp_path, data=None, progress=False)
    for grid in ([0, 4], [], [-2]):
        with pytest.raises(InputError, match="--recurrences"):
            ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, recurrences=grid))
    with pytest.raises(InputError, match="--max-factor"):
        ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, recurrences=None, max_factor=0))
    with pytest.raises(InputError, match="no models"):
        ex.run_extrapolate(settings(tmp_path, micro_dir, gsm8k_dir, models=[]))
    with pytest.raises(InputError, match="short-math"):
        run_conditions(str(micro_dir), tmp_path, data=str(gsm8k_dir), conditions=["persona"], progress=False)
    with pytest.raises(InputError, match="--recurrences"):
        run_conditions(str(micro_dir), tmp_path, data=str(gsm8k_dir), recurrences=4, progress=False)


def test_cli_reports_bad_grid_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "loopscope.cli.main", "extrapolate", "--recurrences", "4,x",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --recurrences") and "Traceback" not in done.stderr


def test_conditions_use_the_same_questions_that_fit_every_condition(tmp_path):
    import dataclasses

    from loopscope.experiments.conditions import fitting_questions
    from loopscope.models.load import LoadedModel

    cfg = dataclasses.replace(preset_config("micro"), max_seq_len=128)
    loaded = LoadedModel(LoopedLM(cfg), load_tokenizer(), "micro-128", "looped", 2)
    from conftest import write_gsm8k

    subset = ex.gsm8k_test_subset(write_gsm8k(tmp_path / "gsm8k", n_train=2, long_every=3))
    rows, skipped = fitting_questions(loaded, subset, ["none", "short-math"], 8)
    assert len(rows) == 8 and skipped > 0  # every third question is over 128 − 36 tokens (BOS + 35 system tokens)
    assert all(len(loaded.tokenizer(r["question"]).input_ids) + 35 <= 128 for r in rows)  # ids include BOS
    with pytest.raises(InputError, match="--condition"):
        fitting_questions(loaded, subset, ["none", "long-persona"], 8)  # the persona alone is > 128 tokens
