"""The architecture grid: verdict rules, agreement with the paper's table, resume."""

from __future__ import annotations

import pandas as pd

from loopscope.experiments import grid
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
        "block_size": [4, 4, 12, 4, 12], "seed": [0, 1, 0, 0, 0],
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
