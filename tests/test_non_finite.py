"""Non-finite states never crash an analysis: a NaN weight and a loop that overflows at large R each give a full
report, with the tokens that went non-finite counted and the recurrence at which they did."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from loopscope.capture import Trajectory
from loopscope.data.tokenizer import load_tokenizer
from loopscope.dynamics.nonfinite import non_finite_summary, non_finite_tokens
from loopscope.experiments.analyze import AnalyzeSettings, run_analyze
from loopscope.experiments.presets import preset_config
from loopscope.models import LoopedLM
from loopscope.models.checkpoint import save_model


def test_first_non_finite_recurrence_and_layer_per_token():
    R, K, B, T, D = 6, 3, 2, 3, 4
    core = torch.randn(R, K, B, T, D)
    core[4, 1, 0, 2, 3] = float("inf")  # token (0, 2): first at recurrence 4, layer 1 …
    core[5:, :, 0, 2] = float("nan")  # … and NaN after (the first one counts)
    core[2, 2, 1, 0, 0] = float("nan")  # token (1, 0): recurrence 2, layer 2
    core[3, 0, 1, 0, 0] = float("nan")
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = False  # padding is not a token, finite or not
    core[:, :, 1, 2] = float("nan")
    table = non_finite_tokens(Trajectory(core=core, mask=mask)).set_index(["batch", "token"])
    assert len(table) == 5
    assert tuple(table.loc[(0, 2)]) == (4, 1) and tuple(table.loc[(1, 0)]) == (2, 2)
    assert (table.drop([(0, 2), (1, 0)])["first_recurrence"] == -1).all()
    summary = non_finite_summary(table.reset_index()).iloc[0]
    assert (summary["n"], summary["non_finite"], summary["first_recurrence_min"]) == (5, 2, 2)
    assert summary["first_recurrence_max"] == 4 and summary["fraction"] == pytest.approx(0.4)


def broken(folder, how: str):
    model = LoopedLM(preset_config("micro+inject", seed=3)).eval()
    with torch.no_grad():
        if how == "nan":
            model.core[0].mlp.up_proj.weight[0] = float("nan")  # one NaN row in a block weight
        else:
            model.adapter.weight.mul_(48)  # the recurrent state grows ×~5 a recurrence: inf at recurrence 54
    return save_model(model, folder, load_tokenizer())


@pytest.mark.parametrize("how, first", [("nan", 0), ("overflow", 54)])
def test_a_non_finite_run_gets_a_full_report(tmp_path, how, first):
    out = tmp_path / "out"
    run_analyze(AnalyzeSettings(model=str(broken(tmp_path / "m", how)), out=out, recurrences=64,
                                attention_recurrences=3, max_prompts=2, batch_size=2, certificate_tokens=2,
                                progress=False))
    summary = pd.read_csv(out / "tables" / "non_finite_summary.csv").iloc[0]
    assert summary["non_finite"] == summary["n"] > 0 and summary["first_recurrence_min"] == first
    html = (out / "index.html").read_text()
    assert f"tokens went non-finite (inf or NaN), first at recurrence {first}" in html
    report = json.loads((out / "report.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    assert any("behaviour" in t.lower() for t in titles) and any("stage" in t.lower() for t in titles)
    for section in report["sections"]:
        for item in section["items"]:
            if "figure" in item:
                assert (out / item["figure"]).read_bytes()[:4] == b"\x89PNG"
    labels = pd.read_csv(out / "tables" / "behaviour_per_token_dynamics.csv")
    assert (labels["behaviour"] == "divergent").all()  # never a fixed point
    cert = pd.read_csv(out / "tables" / "certificate.csv")
    assert not (cert["predicted"] == "stable fixed point").any()
