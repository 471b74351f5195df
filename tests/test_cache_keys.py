"""Caches that cannot serve one model's results as another's: every cache key carries the weights' fingerprint.

Each test builds the trap a user walks into — a checkpoint retrained at the same path, two seeds of one preset
under one name — and checks that the second model gets its own results, equal to a run of it alone.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from loopscope.capture import capture_prompts
from loopscope.capture.stream import StreamSettings, stream_prompts
from loopscope.data.tokenizer import load_tokenizer
from loopscope.dynamics.convergence import SuccessiveChange
from loopscope.experiments import extrapolate as ex
from loopscope.experiments.presets import preset_config
from loopscope.models import LoopedLM, load_model
from loopscope.models.checkpoint import save_model
from loopscope.models.fingerprint import weights_fingerprint

PROMPTS = ["Tom has 3 apples and buys 4 more.", "Ana reads 12 pages a day for 5 days."]


def saved(folder, seed: int, scale: float = 1.0):
    model = LoopedLM(preset_config("micro+inject", seed=seed)).eval()
    with torch.no_grad():
        for p in model.core.parameters():
            p.mul_(scale)
    return save_model(model, folder, load_tokenizer())


def test_fingerprint_sees_every_change_to_the_weights():
    model = LoopedLM(preset_config("micro+inject", seed=3))
    same = LoopedLM(preset_config("micro+inject", seed=3))
    first = weights_fingerprint(model)
    assert first == weights_fingerprint(same) and first.startswith("sha1:")
    model.core[0].attn.q_proj.weight.data[0, 0] += 1e-6  # through .data: the version counter does not move
    assert weights_fingerprint(model) != first
    assert weights_fingerprint(same.to(torch.float64)) != first  # same values, other dtype


def test_a_checkpoint_retrained_at_the_same_path_is_a_cache_miss(tmp_path):
    """Stream a model into a cache, write other weights to the same folder, stream again into the same cache: the
    second run reads no part of the first and equals a fresh run of the new weights."""
    folder = tmp_path / "model"
    s = StreamSettings(6, batch_size=1, progress=False, cache_dir=tmp_path / "cache")
    saved(folder, seed=3)
    first, _ = stream_prompts(load_model(str(folder)), PROMPTS, [SuccessiveChange()], s)
    saved(folder, seed=3, scale=1.5)  # same config, same name, other weights
    again, run = stream_prompts(load_model(str(folder)), PROMPTS, [SuccessiveChange()], s)
    fresh, _ = stream_prompts(load_model(str(folder)), PROMPTS, [SuccessiveChange()],
                              StreamSettings(6, batch_size=1, progress=False))
    assert run["cached_batches_on_rank0"] == 0
    pd.testing.assert_frame_equal(again["successive_change"], fresh["successive_change"])
    assert not first["successive_change"]["l2_mean"].equals(again["successive_change"]["l2_mean"])


def test_captured_batches_are_keyed_by_weights_not_name(tmp_path):
    a = load_model(str(saved(tmp_path / "a" / "looped", seed=1)))
    b = load_model(str(saved(tmp_path / "b" / "looped", seed=2)))
    assert a.name == b.name  # a trained checkpoint's name is its preset
    cache = tmp_path / "cache"
    capture_prompts(a, PROMPTS, 4, cache_dir=cache, progress=False)
    got = capture_prompts(b, PROMPTS, 4, cache_dir=cache, progress=False)
    alone = capture_prompts(b, PROMPTS, 4, progress=False)
    torch.testing.assert_close(got.core, alone.core, atol=0, rtol=0)


def test_two_seeds_of_one_preset_in_one_extrapolate_run_get_their_own_rows(tmp_path, gsm8k_dir):
    """Two checkpoints with one name in one run: each gets its own rows, units and dynamics — equal to a run of
    that checkpoint alone — under names that tell them apart."""
    specs = [str(saved(tmp_path / f"seed{i}" / "looped", seed=i)) for i in (1, 2)]

    def run(models, out):
        return ex.run_extrapolate(ex.ExtrapolateSettings(models=models, out=out, data=str(gsm8k_dir),
                                                         recurrences=[1, 4], loss_questions=6,
                                                         accuracy_questions=0, dynamics_prompts=2, progress=False))

    both = run(specs, tmp_path / "both")
    per_r = both["per_r"]
    assert per_r["model"].nunique() == 2 and all(specs[0] in m or specs[1] in m for m in per_r["model"])
    for i, spec in enumerate(specs):
        alone = run([spec], tmp_path / f"alone{i}")["per_r"].set_index("recurrences")
        mine = per_r[per_r["spec"] == spec].set_index("recurrences")
        for column in ("loss", "successive_change", "fixed_point_distance"):
            assert mine[column].to_numpy() == pytest.approx(alone[column].to_numpy(), rel=1e-9, nan_ok=True), column
        units = both["per_prompt"][both["per_prompt"]["model"] == mine["model"].iloc[0]]
        assert len(units) == 2  # two prompts at R = 4, never both models' four


def test_the_one_resume_rule_computes_once_and_never_leaves_half_a_unit(tmp_path):
    from loopscope.resume import cached_json, load_or_compute

    calls = []

    def compute():
        calls.append(1)
        return {"x": 1.5, "n": [1, 2]}

    def dies_while_writing(value):
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        load_or_compute(tmp_path / "u.json", compute, dies_while_writing, lambda b: b)
    assert not list(tmp_path.iterdir())  # nothing half-written, nothing to be read as finished
    assert cached_json(tmp_path / "u.json", compute) == {"x": 1.5, "n": [1, 2]}
    assert cached_json(tmp_path / "u.json", lambda: pytest.fail("recomputed")) == {"x": 1.5, "n": [1, 2]}
    assert len(calls) == 2 and [p.name for p in tmp_path.iterdir()] == ["u.json"]


def test_weights_held_hashes_once_and_an_edit_after_the_block_is_seen(monkeypatch):
    """Inside `weights_held()` the fingerprint is computed once (one hash per run, not per cache key); outside,
    every call recomputes, so weights edited between two runs (here through `.data`, which moves no version
    counter) change the fingerprint."""
    from conftest import tiny_config

    import loopscope.models.fingerprint as fp
    from loopscope.models.load import LoadedModel
    from loopscope.models.looped import LoopedLM

    loaded = LoadedModel(LoopedLM(tiny_config()).eval(), None, "tiny", "looped", 3)
    calls = []
    original = fp.weights_fingerprint
    monkeypatch.setattr(fp, "weights_fingerprint", lambda m: calls.append(1) or original(m))
    with loaded.weights_held():
        with loaded.weights_held():
            first = loaded.fingerprint()
        assert loaded.fingerprint() == first and len(calls) == 1
    next(loaded.model.parameters()).data[0] += 1.0
    assert loaded.fingerprint() != first and len(calls) == 2
    assert loaded.fingerprint() != first and len(calls) == 3  # recomputed outside a block
