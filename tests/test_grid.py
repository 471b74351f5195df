"""The architecture grid: verdict rules, agreement with the paper's table, resume."""

from __future__ import annotations

import pandas as pd
import pytest

from loopscope.errors import InputError
from loopscope.experiments import grid
from loopscope.experiments.claims import Thresholds
from loopscope.experiments.grid import GridSettings, agreement, cell_verdict, run_grid, verdict_table


def test_cell_verdict_rules():
    assert cell_verdict(0.1, False, 0.5, 1e-4) == "stable"
    assert cell_verdict(0.1, True, 0.5, 1e-4) == "stable, degenerate"
    assert cell_verdict(0.9, True, 1e-6, 1e-4) == "direction converges, norm still changing, degenerate"
    assert cell_verdict(0.9, False, 1e-2, 1e-4) == "not stable"


def test_agreement_with_paper():
    assert agreement("stable", "stable") == "holds"
    assert agreement("direction converges, norm still changing, degenerate", "stable, degenerate") == "partly"
    assert agreement("direction converges, norm still changing", "stable, degenerate") == "differs"
    assert agreement("not stable", "stable") == "differs"


def test_verdict_table_majority_and_paper_column():
    cells = pd.DataFrame({
        "norm": ["pre"] * 3 + ["ouro"] * 2, "injection": ["concat"] * 3 + ["none"] * 2,
        "block_size": [4, 4, 12, 4, 12], "seed": [0, 1, 0, 0, 0], "d_model": 64, "injected_rms": 0.6325,
        "verdict": ["stable", "stable", "not stable", "not stable", "not stable"],
        "min_cosine_to_first_mean": [0.9, 0.8, 0.7, 0.5, 0.6], "final_relative_change_last_layer": [0.0] * 5,
    })
    table = verdict_table(cells).set_index(["norm", "injection"])
    assert table.loc[("pre", "concat"), "measured"] == "stable" and table.loc[("pre", "concat"), "cells"] == "2/3"
    assert table.loc[("pre", "concat"), "k=12"] == "not stable"
    assert table.loc[("ouro", "none"), "paper"] == "not stable" and table.loc[("ouro", "none"), "agreement"] == "holds"


def test_grid_runs_known_cells_and_resumes(tmp_path, monkeypatch):
    """pre-norm with injection contracts to distinct per-layer fixed points; Ouro norm without does not settle
    (the paper's verdicts, reproduced here at 96 recurrences); a rerun computes nothing new."""
    s = GridSettings(out=tmp_path, norms=("pre", "ouro"), injections=("concat", "none"), block_sizes=(4,),
                     seeds=(0,), recurrences=96, n_prompts=2, max_tokens=16, progress=False)
    cells, curves = run_grid(s)
    v = cells.set_index(["norm", "injection"])["verdict"]
    assert v[("pre", "concat")] == "stable" and v[("ouro", "none")] == "not stable"
    assert len(cells) == 4 and set(curves["recurrence"]) == set(range(1, 96))
    # the stability certificate of 4 tokens per cell: the stable cell's block map contracts (ρ < 1), as the
    # detector's fixed points require, and its observed step-size rate is the predicted ρ
    cert = grid.read_certificates(s)
    assert len(cert) == 4 * 4 and set(cert.columns) >= {"rho", "predicted", "behaviour", "step_rate", "agrees"}
    stable = cert[(cert.norm == "pre") & (cert.injection == "concat")]
    assert (stable["predicted"] == "stable fixed point").all() and (stable["rho"] < 0.98).all()
    assert stable["agrees"].all()
    at_rate = stable[stable["at_floor"] == 0]  # tokens still above the float32 floor at the end
    assert len(at_rate) and (abs(at_rate["step_rate"] - at_rate["rho"]) < 0.05).all()
    monkeypatch.setattr(grid, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again, _ = run_grid(s)
    pd.testing.assert_frame_equal(again, cells)


def test_a_cell_whose_verdict_flips_with_the_injected_signal_scale(tmp_path):
    """Sandwich norm + concat injection, k = 4, seed 0, D = 64: with the injected embedding at Huginn's RMS √(2/5)
    the last layer still moves 7.5 % per recurrence at R = 96 (not stable); at RMS 1 (a normed prelude output) it
    settles (relative change ~2e-5). The paper's verdict for this cell ("stable") holds only at the second setting,
    and the claims row says so."""
    from loopscope.experiments.claims import DIFFERS, HOLDS, INCONCLUSIVE, rule_grid

    s = GridSettings(out=tmp_path, norms=("sandwich",), injections=("concat",), block_sizes=(4,), seeds=(0,),
                     injected_rms=(grid.DEFAULT_SETTING["injected_rms"], 1.0), recurrences=96, n_prompts=2,
                     max_tokens=16, certificate_tokens=0, progress=False)
    cells, curves = run_grid(s)
    by_rms = cells.set_index("injected_rms")
    assert by_rms.loc[0.6325, "verdict"] == "not stable"
    assert by_rms.loc[0.6325, "final_relative_change_last_layer"] > 1e-2
    assert by_rms.loc[1.0, "verdict"] == "stable" and by_rms.loc[1.0, "final_relative_change_last_layer"] < 1e-3
    table = verdict_table(cells)
    assert table["default"].tolist() == [True, False] and table["agreement"].tolist() == ["differs", "holds"]
    rule = rule_grid(injection_on=True)
    one = rule({"grid_cells": cells}, Thresholds())
    assert one.verdict == INCONCLUSIVE  # one cell per setting: its exact interval [0, 0.975] cannot decide
    assert "D=64, injected RMS 1: inconclusive — sandwich: 1/1 cells" in one.evidence  # the other setting is named
    # nine independent cells per setting (the seeds × block sizes of the full grid) with these verdicts decide it
    nine = pd.concat([cells.assign(seed=k) for k in range(9)], ignore_index=True)
    assert rule({"grid_cells": nine}, Thresholds()).verdict == DIFFERS  # the default setting decides the row …
    assert "D=64, injected RMS 1: holds" in rule({"grid_cells": nine}, Thresholds()).evidence  # … and where it holds
    flipped = nine.assign(injected_rms=nine["injected_rms"].map({0.6325: 1.0, 1.0: 0.6325}))
    assert rule({"grid_cells": flipped}, Thresholds()).verdict == HOLDS  # were RMS 1 the default: holds
    # the report draws the default setting's curves; the min-cosine matrix has one row per setting
    views = grid.grid_views(cells, curves)
    assert views["shown_setting"] == (64, 0.6325) and len(views["min_cosine"]) == 2


def test_the_default_injected_rms_is_huginns_rule_exactly():
    """The default cells are the models they were before the RMS was an axis: embeddings × √D."""
    cfg = grid.grid_config("pre", "concat", 4, 0, 64)
    assert cfg.embed_scale == 8.0
    assert grid.grid_config("pre", "concat", 4, 0, 64, None, 1.0).embed_scale == pytest.approx(1.0 / (2 / 320) ** 0.5)


def test_a_rerun_with_another_r_recomputes_every_cell(tmp_path, monkeypatch):
    """A finished cell is keyed on every setting that changes it: rerun into the same folder with another R, each
    cell runs again, and the tables equal a fresh run's at that R (the R = 32 verdict is never reported for R = 8)."""
    small = dict(norms=("pre",), injections=("concat",), block_sizes=(4,), seeds=(0,), n_prompts=2, max_tokens=8,
                 certificate_tokens=0, progress=False)
    run_grid(GridSettings(out=tmp_path / "same", recurrences=32, **small))
    calls = []
    real = grid.run_cell
    monkeypatch.setattr(grid, "run_cell", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    again, curves = run_grid(GridSettings(out=tmp_path / "same", recurrences=8, **small))
    fresh, fresh_curves = run_grid(GridSettings(out=tmp_path / "fresh", recurrences=8, **small))
    assert calls == [8, 8]
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), fresh.drop(columns="seconds"))
    pd.testing.assert_frame_equal(curves, fresh_curves)
    assert curves["recurrence"].max() == 7 and len(pd.read_csv(tmp_path / "same" / "grid_cells.csv")) == 1


def test_a_grid_killed_mid_run_resumes_to_the_tables_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """A kill during the second cell leaves the first whole (row, curves and certificates in one atomic file) and
    nothing of the second; the resumed grid's tables equal an uninterrupted run's."""
    small = dict(norms=("pre", "ouro"), injections=("concat",), block_sizes=(4,), seeds=(0,), recurrences=16,
                 n_prompts=2, max_tokens=8, certificate_tokens=2, progress=False)
    whole, whole_curves = run_grid(GridSettings(out=tmp_path / "whole", **small))
    real = grid.run_cell
    calls = []

    def dies_on_the_second(*a, **k):
        calls.append(a[0].norm)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(grid, "run_cell", dies_on_the_second)
    s = GridSettings(out=tmp_path / "killed", **small)
    with pytest.raises(KeyboardInterrupt):
        run_grid(s)
    assert len(list((tmp_path / "killed" / "cache" / "grid").glob("*.json"))) == 1
    monkeypatch.setattr(grid, "run_cell", real)
    cells, curves = run_grid(s)
    pd.testing.assert_frame_equal(cells.drop(columns="seconds"), whole.drop(columns="seconds"))
    pd.testing.assert_frame_equal(curves, whole_curves)
    timing = ["seconds", "seconds_per_token"]
    pd.testing.assert_frame_equal(grid.read_certificates(s).drop(columns=timing, errors="ignore"),
                                  grid.read_certificates(GridSettings(out=tmp_path / "whole", **small))
                                  .drop(columns=timing, errors="ignore"))


def test_an_unknown_norm_is_refused_before_any_cell_runs(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.setattr(grid, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a cell ran")))
    with pytest.raises(InputError, match="norm 'foo' is not one of pre, sandwich, ouro"):
        run_grid(GridSettings(out=tmp_path, norms=("pre", "foo"), progress=False))
    code, out, err = run_cli(["grid", "--norms", "pre,foo", "--out", tmp_path / "cli"], capsys)
    assert code == 2 and "'foo' is not one of pre, sandwich, ouro" in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1
