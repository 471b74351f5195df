"""`loopscope analyze` end to end on a small run: the report's files agree with the analyses, and resume works."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pandas as pd
import pytest

from loopscope.capture import prompts as capture_prompts_module
from loopscope.experiments.analyze import AnalyzeSettings, run_analyze


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_analyze(AnalyzeSettings(out=out, recurrences=12, attention_recurrences=3, max_prompts=3, batch_size=2,
                                certificate_tokens=4, progress=False))
    return out


def test_every_figure_has_its_csv_and_is_embedded(report_dir):
    manifest = json.loads((report_dir / "report.json").read_text())
    html = (report_dir / "index.html").read_text()
    figures = [i for s in manifest["sections"] for i in s["items"] if "figure" in i]
    assert len(figures) >= 7
    for item in figures:
        png = (report_dir / item["figure"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert base64.b64encode(png).decode()[:200] in html  # self-contained: the image is inside the page
        assert item["csv"] and all((report_dir / c).exists() for c in item["csv"])


def test_tables_agree_with_the_run(report_dir):
    tables = report_dir / "tables"
    dist = pd.read_csv(tables / "distance_to_fixed_point.csv")
    assert dist["recurrence"].max() == 11 and sorted(dist["layer"].unique()) == [0, 1, 2, 3]
    assert (dist[dist.recurrence == 11]["l2_mean"] == 0).all()  # X* is the last state itself
    counts = pd.read_csv(tables / "behaviour_counts.csv", index_col=0)
    per_token = pd.read_csv(tables / "behaviour_per_token_dynamics.csv")
    assert counts["dynamics detector"].sum() == counts["paper heuristic"].sum() == len(per_token)
    sim = pd.read_csv(tables / "residual_similarity.csv", index_col=[0, 1], header=[0, 1])
    assert sim.shape == (3 * 4, 3 * 4)  # attention run: 3 recurrences × 4 block layers
    assert abs(sim.to_numpy().diagonal() - 1).max() < 1e-5


def test_rerun_resumes_from_cached_batches(report_dir, monkeypatch):
    before = pd.read_csv(report_dir / "tables" / "successive_change.csv")

    def refuse(*a, **k):
        raise AssertionError("a finished batch was captured again")

    monkeypatch.setattr(capture_prompts_module, "capture", refuse)
    run_analyze(AnalyzeSettings(out=report_dir, recurrences=12, attention_recurrences=3, max_prompts=3, batch_size=2,
                                certificate_tokens=4, progress=False))
    pd.testing.assert_frame_equal(pd.read_csv(report_dir / "tables" / "successive_change.csv"), before)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "loopscope.cli.main", *args], capture_output=True, text=True)

    r = run("analyze", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "neither an existing path nor a builtin" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", "--recurrences", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "at least 2 recurrences" in r.stderr
    (tmp_path / "empty.txt").write_text("")
    r = run("analyze", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "empty" in r.stderr
    r = run("analyze", "--help")
    assert r.returncode == 0 and "Resuming" in r.stdout


@pytest.mark.parametrize("recurrences", [2, 6])
def test_small_recurrences_analyse_what_they_can_and_say_what_needs_more(tmp_path, recurrences):
    """R = 2..6 is below the behaviour detectors' tail window (8): the run still writes convergence, similarity,
    degeneracy and stages, and the behaviour section says it was skipped and how many recurrences it needs —
    instead of failing inside the classifier."""
    from loopscope.dynamics.rule_dynamics import MIN_RECURRENCES

    assert recurrences < MIN_RECURRENCES
    out = tmp_path / f"r{recurrences}"
    run_analyze(AnalyzeSettings(out=out, recurrences=recurrences, attention_recurrences=2, max_prompts=2,
                                batch_size=2, certificate_tokens=4, progress=False))
    tables = out / "tables"
    change = pd.read_csv(tables / "successive_change.csv")
    assert sorted(change["recurrence"].unique()) == list(range(1, recurrences))
    assert (tables / "degeneracy_summary.csv").exists() and (tables / "distance_to_fixed_point.csv").exists()
    assert not (tables / "behaviour_counts.csv").exists() and not (tables / "certificate.csv").exists()
    titles = [s["title"] for s in json.loads((out / "report.json").read_text())["sections"]]
    skipped = [t for t in titles if t.startswith("Per-token behaviour (skipped)")]
    assert skipped, titles
    html = (out / "index.html").read_text()
    assert f"this run has {recurrences}" in html and f"at least {MIN_RECURRENCES}" in html
