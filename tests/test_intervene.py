"""`loopscope intervene`: option parsing, the report of a run, the massive-activation ablation (trained default and
real SmolLM2), and bad input refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from hf_helpers import GSM8K_TEST, save_tiny, smollm2

from loopscope.errors import InputError
from loopscope.experiments.intervene import InterveneSettings, run_intervene
from loopscope.interventions import DeleteLayer, SwapLayers, ZeroSublayer
from loopscope.interventions.parse import parse_interventions


def cli(*args):
    return subprocess.run([sys.executable, "-m", "loopscope.cli.main", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def table(out, name):
    return pd.read_csv(out / "tables" / f"{name}.csv")


def test_options_parse_into_specs_in_order():
    specs = parse_interventions(["core:2"], ["prelude:0"], ["coda:1"], ["core:2,1"], "1,0")
    assert specs == [ZeroSublayer("core", 2, "mlp", (0, 1)), ZeroSublayer("prelude", 0, "attn", (0, 1)),
                     DeleteLayer("coda", 1), SwapLayers("core", 1)]
    assert parse_interventions(["core:0"], at_recurrences="none") == [ZeroSublayer("core", 0, "mlp", ())]
    assert parse_interventions(["CORE:0"], at_recurrences="all")[0].recurrences is None
    for kwargs, message in [
        (dict(zero_mlp=["core"]), "expected SEGMENT:LAYER"),
        (dict(zero_mlp=["core:x"]), "not a layer index"),
        (dict(zero_attn=["body:1"]), "segment 'body' unknown"),
        (dict(delete=["core:-1"]), "not a layer index"),
        (dict(swap=["core:1,3"]), "not adjacent"),
        (dict(swap=["core:1"]), "two adjacent layers"),
        (dict(zero_mlp=["core:1"], at_recurrences="0,a"), "not a recurrence index"),
        (dict(delete=["core:1"], at_recurrences="0"), "restricts zeroing only"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_interventions(**kwargs)


@pytest.fixture(scope="module")
def control_and_zero(tmp_path_factory):
    """Two CLI runs on the trained default (R = 3, 2 prompts): zeroing nowhere, and core:1's MLP at recurrence 1."""
    runs = {}
    for name, when in (("control", "none"), ("zero", "1")):
        out = tmp_path_factory.mktemp(name)
        r = cli("intervene", "--model", "default", "--zero-mlp", "core:1", "--at-recurrences", when, "-r", "3",
                "--max-prompts", "2", "--out", str(out), "-q")
        assert r.returncode == 0, r.stderr
        runs[name] = out
    return runs


def test_zeroing_nothing_changes_nothing(control_and_zero):
    out = control_and_zero["control"]
    summary = table(out, "kl_summary").iloc[0]
    assert summary["max_kl"] == 0 and summary["top1_agreement"] == 1
    after, before = table(out, "stages_per_state"), table(out, "stages_per_state_baseline")
    pd.testing.assert_frame_equal(after, before)
    aligned = table(out, "alignment_to_baseline")
    assert (aligned["rmse"] == 0).all() and sorted(aligned.recurrence.unique()) == [0, 1, 2]
    manifest = json.loads((out / "report.json").read_text())
    html = (out / "index.html").read_text()
    figures = [i for s in manifest["sections"] for i in s["items"] if "figure" in i]
    assert len(figures) >= 10 and "kl_per_token" in figures[-1]["figure"]
    for item in figures:
        assert (out / item["figure"]).read_bytes()[:4] == b"\x89PNG" and item["csv"]
        assert item["figure"].split("/")[-1] in html


def test_zeroing_at_recurrence_one_leaves_earlier_states_alone(control_and_zero):
    out = control_and_zero["zero"]
    assert table(out, "kl_summary").iloc[0]["mean_kl"] > 1e-4
    after, before = table(out, "stages_per_state"), table(out, "stages_per_state_baseline")
    early = (before.segment == "prelude") | ((before.segment == "core") & (before.recurrence == 0))
    late = (before.segment == "core") & (before.recurrence == 1) & (before.layer >= 1)
    cols = ["token_norm_mean_mean", "colsum_concentration_mean", "matrix_entropy_normalised_mean"]
    assert (after[early][cols].to_numpy() == pytest.approx(before[early][cols].to_numpy(), abs=1e-5))
    assert (after[late][cols].to_numpy() - before[late][cols].to_numpy()).__abs__().max() > 1e-3
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["intervention"] == "zero the MLP of core layer 1 at recurrence 1"  # words, never a Python dict


def test_massive_activation_ablation_on_the_trained_default(tmp_path):
    """The default's sandwich norm keeps peak/median |x| near 6 (no massive activations, as for Huginn in the
    paper); by hand the peak first reaches half its maximum right after prelude layer 0 (0.22 in the embedding →
    3.8, max 4.2), so that MLP is the one zeroed, the report says there is nothing massive, and little moves."""
    run_intervene(InterveneSettings(model="default", massive_activation_ablation=True, max_prompts=2,
                                    recurrences=3, progress=False, out=tmp_path))
    meta = json.loads((tmp_path / "report.json").read_text())["meta"]
    assert meta["intervention"] == "zero the MLP of prelude layer 0"
    profile = table(tmp_path, "massive_profile")
    onset = profile[profile.onset]
    assert len(onset) == 1 and onset.iloc[0]["segment"] == "prelude" and onset.iloc[0]["layer"] == 0
    assert profile["ratio_before"].max() < 20 and profile["ratio_after"].max() < 20
    assert "NO massive activations" in (tmp_path / "index.html").read_text()
    assert table(tmp_path, "kl_summary").iloc[0]["mean_kl"] < 0.1


@pytest.mark.slow
def test_massive_activation_ablation_on_smollm2(tmp_path):
    """SmolLM2-135M: by hand (zeroing each candidate) the first token's dimension 507 jumps from ~10² to ~2.4·10⁴
    right after layer 11, whose MLP writes it (zeroing its attention instead leaves the peak); the onset rule
    picks core:11, zeroing its MLP cuts the largest peak/median ratio by > 10× and moves the output (KL > 0.5)."""
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:1]]
    prompts = tmp_path / "one.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": r["question"]}) for r in rows))
    out = tmp_path / "report"
    run_intervene(InterveneSettings(model="smollm2", prompts=str(prompts), massive_activation_ablation=True,
                                    progress=False, out=out), loaded=smollm2())
    profile = table(out, "massive_profile")
    onset = profile[profile.onset].iloc[0]
    assert (onset["segment"], onset["layer"]) == ("core", 11)
    assert onset["growth"] > 50 and onset["ratio_before"] > 5000
    assert profile["ratio_before"].max() > 10 * profile["ratio_after"].max()
    assert onset["ratio_before"] > 100 * onset["ratio_after"]
    assert table(out, "kl_summary").iloc[0]["mean_kl"] > 0.5
    assert "has massive activations" in (out / "index.html").read_text()


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from conftest import run_cli

    hf_dir = tmp_path / "tiny-llama"
    save_tiny("llama", hf_dir)
    for args, message in [
        ((), "give exactly one of"),
        (("--zero-mlp", "core:2", "--massive-activation-ablation"), "give exactly one of"),
        (("--zero-mlp", "core:x"), "not a layer index"),
        (("--swap", "core:1,3"), "not adjacent"),
        (("--zero-mlp", "core:9"), "layer must be in 0..3"),
        (("--zero-attn", "core:0", "--at-recurrences", "5", "-r", "4"), "R=4"),
        (("--model", str(hf_dir), "--zero-mlp", "core:0", "-r", "3"), "feedforward model and runs once"),
        (("--model", str(hf_dir), "--zero-mlp", "prelude:0"), "only the 'core' segment"),
    ]:
        code, _, err = run_cli(["intervene", *args, "--max-prompts", "1", "--out", str(tmp_path / "o"), "-q"], capsys)
        assert code == 2 and message in err and "Traceback" not in err and "{'" not in err, (args, err)
