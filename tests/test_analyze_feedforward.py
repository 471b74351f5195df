"""`loopscope analyze` with feedforward models: `--feedforward` overlays and scores a feedforward profile, and a
feedforward `--model` (R = 1) gets a stages-only report with the dynamics skipped, on GSM8K questions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hf_helpers import GSM8K_TEST, save_tiny

from loopscope.data.prompts import load_prompts
from loopscope.experiments.analyze import AnalyzeSettings, run_analyze


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama on disk with the bundled tokenizer (GSM8K questions fit its 128-token context)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", path)
    return path


def test_gsm8k_jsonl_prompts_are_the_questions():
    first = json.loads(GSM8K_TEST.read_text().splitlines()[0])
    assert load_prompts(GSM8K_TEST, limit=2)[0] == first["question"]


def test_cli_feedforward_overlay_is_aligned_per_recurrence(tmp_path, tiny_llama):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "loopscope.cli.main", "analyze", "--model", "default", "--feedforward",
                        str(tiny_llama), "--prompts", str(GSM8K_TEST), "--max-prompts", "2", "--recurrences", "8",
                        "--attention-recurrences", "2", "--out", str(out), "-q"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    aligned = pd.read_csv(out / "tables" / "alignment.csv")
    assert sorted(aligned.recurrence.unique()) == [0, 1]
    assert {"colsum_concentration", "sink_rate", "massive_activation_ratio"} <= set(aligned.metric)
    assert aligned[["pearson", "rmse"]].notna().any().all()
    ff = pd.read_csv(out / "tables" / "stages_per_state_feedforward.csv")
    assert set(ff.segment) == {"core"} and set(ff.recurrence) == {0} and len(ff) == 4
    assert "settings" in json.loads((out / "report.json").read_text())["meta"]


def test_feedforward_model_gets_stages_and_a_note_instead_of_dynamics(tmp_path, tiny_llama):
    out = tmp_path / "report"
    run_analyze(AnalyzeSettings(model=str(tiny_llama), prompts=str(GSM8K_TEST), max_prompts=2, out=out,
                                progress=False))
    manifest = json.loads((out / "report.json").read_text())
    titles = [s["title"] for s in manifest["sections"]]
    assert titles[0] == "Dynamics (skipped)" and any(t.startswith("Stages of inference") for t in titles)
    assert "R ≥ 2" in (out / "index.html").read_text()
    stage = pd.read_csv(out / "tables" / "stages_per_state.csv")
    assert len(stage) == 4 and set(stage.recurrence) == {0}
    assert stage["colsum_concentration_mean"].notna().all() and stage["logit_entropy_mean"].notna().all()
    assert not (out / "tables" / "prop42_summary.csv").exists()
    assert manifest["meta"]["recurrences"] == "1 (feedforward model)"
