"""Views (by realized depth / recurrence / layer) and the alignment score against a feedforward model."""

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope.capture.record import capture
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.models.config import LoopedConfig
from loopscope.models.looped import LoopedLM
from loopscope.stages import alignment, by_layer, by_realized_depth, by_recurrence, residual_norms


def metric_table(P: int, K: int, C: int, R: int) -> pd.DataFrame:
    """A per-state table for a (P, K⊗R, C) model whose value is 10·depth and std is depth."""
    index = Trajectory(core=torch.zeros(R, K, 1, 1, 1), prelude=torch.zeros(P, 1, 1, 1) if P else None,
                       coda=torch.zeros(C, 1, 1, 1) if C else None).realized_index()
    index["m_mean"] = 10.0 * index.depth
    index["m_std"] = index.depth.astype(float)
    index["n"] = 3
    return index.sample(frac=1.0, random_state=0)  # views must not rely on row order


def test_by_realized_depth_sorts_by_depth_and_carries_the_spread():
    out = by_realized_depth(metric_table(1, 2, 1, 2), "m_mean")
    assert out.x.tolist() == [1, 2, 3, 4, 5, 6]
    assert out.y.tolist() == [10, 20, 30, 40, 50, 60]
    assert out.y_std.tolist() == [1, 2, 3, 4, 5, 6]
    assert out.segment.tolist() == ["prelude", "core", "core", "core", "core", "coda"]


def test_by_recurrence_includes_prelude_and_coda_in_every_profile():
    out = by_recurrence(metric_table(1, 2, 1, 2), "m_mean")
    first, second = out[out.recurrence == 0], out[out.recurrence == 1]
    assert first.x.tolist() == pytest.approx([0, 100 / 3, 200 / 3, 100])
    assert second.x.tolist() == pytest.approx([0, 100 / 3, 200 / 3, 100])
    # prelude (depth 1) and coda (depth 6) appear in both passes; the block rows are each pass's own
    assert first.depth.tolist() == [1, 2, 3, 6]
    assert second.depth.tolist() == [1, 4, 5, 6]
    assert second.y.tolist() == [10, 40, 50, 60]
    assert second.segment.tolist() == ["prelude", "core", "core", "coda"]


def test_by_layer_follows_each_block_layer_across_recurrences():
    out = by_layer(metric_table(1, 2, 1, 3), "m_mean")
    assert out.layer.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.x.tolist() == [0, 1, 2, 0, 1, 2]
    assert out.y.tolist() == [20, 40, 60, 30, 50, 70]  # depth of (t, j) = 1 + 2t + j + 1


def test_views_refuse_several_rows_per_state():
    table = pd.concat([metric_table(0, 2, 0, 1).assign(head=0), metric_table(0, 2, 0, 1).assign(head=1)])
    with pytest.raises(InputError, match="per-head rows"):
        by_recurrence(table, "m_mean")
    assert len(by_recurrence(table[table["head"] == 1], "m_mean")) == 2


def profile_table(values: list[float]) -> pd.DataFrame:
    """A feedforward-style table (one recurrence, K = len(values) block layers) with value `m`."""
    index = Trajectory(core=torch.zeros(1, len(values), 1, 1, 1)).realized_index()
    index["m"] = values
    return index


def looped_table(profiles: list[list[float]]) -> pd.DataFrame:
    index = Trajectory(core=torch.zeros(len(profiles), len(profiles[0]), 1, 1, 1)).realized_index()
    index["m"] = [v for p in profiles for v in p]
    return index


def test_alignment_identical_reversed_and_shifted_profiles():
    ff = profile_table([0.0, 1.0, 2.0, 3.0])
    looped = looped_table([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.5, 2.5, 3.5, 4.5]])
    out = alignment(looped, ff, "m")
    assert out.recurrence.tolist() == [0, 1, 2]
    assert out.pearson.tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert out.spearman.tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert out.rmse[0] == pytest.approx(0.0, abs=1e-12)
    assert out.rmse[2] == pytest.approx(1.5)  # a constant shift of 1.5
    assert out.nrmse[2] == pytest.approx(0.5)  # over the feedforward range 3
    assert (out.n_points == 50).all()


def test_alignment_resamples_profiles_of_different_depth():
    # a 3-state looped pass of a linear profile against a 5-layer feedforward linear profile: same line
    out = alignment(looped_table([[0.0, 5.0, 10.0]]), profile_table([0.0, 2.5, 5.0, 7.5, 10.0]), "m", grid=11)
    assert out.pearson[0] == pytest.approx(1.0) and out.rmse[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="recurrences=1"):
        alignment(looped_table([[0.0, 1.0]]), looped_table([[0.0, 1.0], [1.0, 0.0]]), "m")


def test_alignment_against_a_feedforward_trajectory_end_to_end():
    # A feedforward model is a LoopedLM with R = 1 and no prelude/coda: its layers are the block.
    ff_model = LoopedLM(LoopedConfig(vocab_size=64, d_model=32, n_heads=4, d_mlp=48, n_prelude=0, n_block=4,
                                     n_coda=0, recurrences=1, init_std=0.3, seed=2))
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    ff = capture(ff_model, ids, recurrences=1)
    ff_table = residual_norms(ff)
    layers = ff.core[0]  # [4, B, T, D]
    # a "looped" trajectory that re-enacts the feedforward stack every pass: prelude = layer 0,
    # block = layers 1-2 (twice), coda = layer 3; and a third pass whose block is scaled ×3
    block = torch.stack([layers[1:3], layers[1:3], 3 * layers[1:3]])
    looped = Trajectory(core=block, prelude=layers[:1], coda=layers[3:])
    out = alignment(residual_norms(looped), ff_table, "token_norm_mean_mean")
    assert out.pearson[:2].tolist() == pytest.approx([1.0, 1.0])
    assert out.rmse[:2].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    assert out.rmse[2] > 0.1 and out.nrmse[2] > 0.1
    expected_profile = residual_norms(ff).token_norm_mean_mean.to_numpy()
    got = by_recurrence(residual_norms(looped), "token_norm_mean_mean")
    assert got[got.recurrence == 0].y.to_numpy() == pytest.approx(expected_profile)
    assert np.all(np.diff(got.x.to_numpy()[:4]) > 0)


@pytest.mark.parametrize(("P", "C", "expected"), [(2, 1, ["prelude", "coda"]), (0, 0, []), (1, 0, ["prelude"])])
def test_realized_depth_legend_names_only_the_segments_the_model_has(tmp_path, monkeypatch, P, C, expected):
    from loopscope.report import figures
    from loopscope.report.stages_section import three_views

    shown = {}
    real_save = figures.save

    def keep(fig, out, name):
        shown["fig"] = fig
        return real_save(fig, out, name)

    monkeypatch.setattr(figures, "save", keep)
    png, views = three_views(metric_table(P, 3, C, 4), "m_mean", "m", tmp_path, "m", None, "ff")
    legend = shown["fig"].axes[0].get_legend()
    assert ([t.get_text() for t in legend.get_texts()] if legend else []) == expected
    assert png.exists() and set(views["view"]) == {"realized_depth", "by_recurrence", "by_layer"}


def test_spearman_is_rank_correlation_not_pearson():
    """A monotone but convex pass (x³ against x): ranks agree exactly (Spearman 1), values do not (Pearson < 1)."""
    from loopscope.stages.alignment import pearson, spearman

    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    cubed = x ** 3
    assert spearman(cubed, x) == pytest.approx(1.0)
    assert pearson(cubed, x) == pytest.approx(154 / 170)  # by hand: Σ(x−2)(x³−20) = 154, √(10·2890) = 170
    # average ranks for ties
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.8660, abs=1e-3)


def test_line_panels_names_every_model_when_the_series_are_names(tmp_path, monkeypatch):
    """21 trained models (7 presets × 3 seeds) as series: a legend naming each one in its own colour; a colour scale
    (right for 17+ layers or recurrences) cannot stand for names, and failed on them."""
    from loopscope.report import figures

    names = [f"preset{p}-s{s}" for p in range(7) for s in range(3)]
    df = pd.DataFrame([{"step": t, "loss": 5.0 - t / 10 + i / 100, "model": n}
                       for i, n in enumerate(names) for t in range(3)])
    seen = {}

    def keep(fig, out, name):
        seen["fig"] = fig
        return out / f"{name}.png"

    monkeypatch.setattr(figures, "save", keep)
    figures.line_panels(df, "step", [("loss", "loss")], "model", tmp_path, "loss", title="t", series_label="")
    ax = seen["fig"].axes[0]
    legend = [t.get_text().strip() for t in ax.get_legend().get_texts()]
    assert legend == sorted(names)
    assert len({tuple(line.get_color()) for line in ax.get_lines()}) == 20  # tab20: distinct colours (then it cycles)
    # numeric series keep the colour scale beyond 16 values
    layers = pd.DataFrame([{"step": t, "loss": 1.0, "layer": k} for k in range(20) for t in range(2)])
    figures.line_panels(layers, "step", [("loss", "loss")], "layer", tmp_path, "l", title="t")
    assert seen["fig"].axes[0].get_legend() is None
