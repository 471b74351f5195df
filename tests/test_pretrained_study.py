"""`loopscope reproduce --pretrained` (`experiments.pretrained_study`, rules in `experiments.pretrained_claims`):
bad checkpoint specs refused in one line, the plan's stand-in and paper defaults, rules on hand-made tables (per
model, intervals over prompts, never judged from a toy), and the study end to end on tiny checkpoints in each
published format (Ouro, Huginn, retrofit, a feedforward Llama) with every judged row recomputed from its CSVs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _families_reference import write_huginn, write_ouro, write_retrofit
from conftest import run_cli, write_gsm8k
from hf_helpers import save_tiny

from loopscope.errors import InputError
from loopscope.evidence import bootstrap_mean, bootstrap_ratio
from loopscope.experiments.claims import (
    DIFFERS,
    HOLDS,
    INCONCLUSIVE,
    NOT_MEASURABLE,
    Thresholds,
    evaluate_claims,
)
from loopscope.experiments.pretrained_claims import PRETRAINED_CLAIMS
from loopscope.experiments.pretrained_study import STAND_IN, STAND_IN_BASE, pretrained_plan

TH = Thresholds()
IDS = [c.id for c in PRETRAINED_CLAIMS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints in each published format, and a GSM8K folder."""
    root = tmp_path_factory.mktemp("pretrained")
    write_ouro(root / "ouro", dtype=torch.float32)
    write_huginn(root / "huginn", block_size=512)  # App. C's persona prompt is 420 tokens long
    write_retrofit(root / "retrofit")
    save_tiny("llama", root / "llama")
    write_gsm8k(root / "gsm8k", n_train=20)
    return root


def judge(m: dict) -> pd.DataFrame:
    """The pretrained rows alone, judged on `m` (the toy rules need their own full tables)."""
    return pd.DataFrame([{"id": c.id, **vars(c.rule(m, TH))} for c in PRETRAINED_CLAIMS])


def verdict(claim_id: str, m: dict):
    return next(c.rule for c in PRETRAINED_CLAIMS if c.id == claim_id)(m, TH)


# ---------------------------------------------------------------------------------------------- the plan

def test_bad_specs_are_one_line_input_errors(checkpoints, tmp_path, capsys):
    r = checkpoints
    cases = [
        (["--looped", "ouro"], "NAME=PATH"),
        (["--looped", f"llama={r / 'ouro'}"], "unknown family 'llama'"),
        (["--looped", f"ouro={r / 'nowhere'}"], "does not exist"),
        (["--looped", "ouro=default"], "never stands in"),  # a toy never stands in for a pretrained family
        (["--looped", "huginn=default-random"], "never stands in"),
        (["--looped", f"huginn={r / 'ouro'}"], "not a published huginn checkpoint"),
        (["--looped", f"retrofit={r / 'huginn'}"], "not a published retrofit checkpoint"),
        (["--looped", f"ouro={r / 'ouro'}", "--looped", f"ouro={r / 'ouro'}"], "given twice"),
        (["--feedforward", "llama=smollm2"], "is a builtin"),
        (["--feedforward", f"llama={r / 'huginn'}"], "not a Hugging Face feedforward"),
        (["--questions", "300"], "1..256"),
        (["--recurrences", "4"], "at least 8"),
        (["--seeds", "3"], "trains nothing"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["reproduce", "--pretrained", "--data", r / "gsm8k", "--out", tmp_path / "o",
                                *extra], capsys)
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["reproduce", "--data", r / "gsm8k", "--looped", f"ouro={r / 'ouro'}", "--out",
                            tmp_path / "o"], capsys)
    assert code == 2 and "add --pretrained" in err
    assert not (tmp_path / "o").exists()  # refused before the folder was claimed
    code, out, _ = run_cli(["reproduce", "--help"], capsys)
    assert code == 0 and "PRETRAINED CHECKPOINTS" in out and "--looped" in out and "--feedforward" in out


def test_plan_follows_the_paper_and_stands_in_only_for_the_retrofit(checkpoints):
    r = checkpoints
    plan = pretrained_plan([f"ouro={r / 'ouro'}", f"huginn={r / 'huginn'}"], [f"llama={r / 'llama'}"])
    assert (plan.questions, plan.recurrences, plan.attention_recurrences) == (256, 128, 8)
    assert (plan.conditions_questions, plan.conditions_recurrences) == (256, 128)
    assert [m.family for m in plan.models] == ["ouro", "huginn", "retrofit"]
    assert plan.model("ouro").reference == "llama" and not plan.model("ouro").stand_in
    retro = plan.model("retrofit")  # not given: the builtin healed retrofit, aligned with its own base
    assert retro.stand_in and retro.spec == STAND_IN and retro.reference == STAND_IN_BASE
    assert plan.references[STAND_IN_BASE] == STAND_IN_BASE
    given = pretrained_plan([f"retrofit={r / 'retrofit'}"], [], questions=3, recurrences=40)
    assert not given.model("retrofit").stand_in and given.model("retrofit").reference is None
    assert given.model("ouro") is None and given.model("huginn") is None  # nothing stands in for them
    assert (given.questions, given.recurrences, given.conditions_recurrences) == (3, 40, 40)
    with pytest.raises(InputError, match="never stands in"):
        pretrained_plan(["ouro=smollm2-looped"], [])  # the stand-in is for the retrofit only
    explicit = pretrained_plan([f"retrofit={STAND_IN}"], []).model("retrofit")
    assert explicit.stand_in and explicit.reference == STAND_IN_BASE


# ---------------------------------------------------------------------------------------------- the rules

def models_row(family: str, stand_in: bool = False, recurrences: int = 128, trained: int = 4, **kw) -> dict:
    return dict(family=family, model=f"/ckpt/{family}", stand_in=stand_in, reference="llama",
                recurrences=recurrences, trained_recurrences=trained, fraction_orbit=0.0, fraction_slider=0.0,
                orbit_slider_cooccurrence=0, massive_ratio=10.0, **kw)


def fixed(family: str, tokens, converged, distinct) -> pd.DataFrame:
    return pd.DataFrame({"family": family, "prompt": range(len(tokens)), "tokens": tokens, "converged": converged,
                         "distinct": distinct})


def test_fixed_point_rows_are_per_model_with_intervals_over_prompts():
    m = {"pretrained_models": pd.DataFrame([models_row("huginn", trained=32), models_row("ouro")]),
         "pretrained_fixed_points": pd.concat([fixed("huginn", [50, 60, 40], [49, 60, 40], [48, 59, 39]),
                                               fixed("ouro", [50, 60, 40], [2, 0, 5], [0, 0, 0])])}
    h = verdict("pretrained-fixed-points-huginn", m)
    assert h.verdict == HOLDS and (h.effect, h.ci_low, h.ci_high) == bootstrap_ratio([48, 59, 39], [50, 60, 40])
    assert verdict("pretrained-fixed-points-ouro", m).verdict == HOLDS  # Ouro: surely below half
    assert verdict("pretrained-fixed-points-retrofit", m).verdict == NOT_MEASURABLE  # not given: only its row
    assert "retrofit=PATH" in verdict("pretrained-fixed-points-retrofit", m).evidence
    # the prompt is the unit: two prompts that disagree leave the interval wide (tokens as units would say "holds")
    split = {**m, "pretrained_fixed_points": fixed("huginn", [200, 200], [200, 0], [200, 0])}
    assert verdict("pretrained-fixed-points-huginn", split).verdict == INCONCLUSIVE
    split = {**m, "pretrained_fixed_points": fixed("huginn", [200, 200, 200], [0, 10, 200], [0, 10, 190])}
    assert verdict("pretrained-fixed-points-huginn", split).verdict == INCONCLUSIVE


def test_stage_rows_read_each_prompt_against_the_reference():
    rows = [{"family": f, "reference": "llama", "prompt": p, "recurrence": t, "pearson": r}
            for f, base in (("ouro", 0.8), ("huginn", 0.1)) for p in range(4) for t in range(3)
            for r in [base + 0.02 * (p - t)]]
    m = {"pretrained_models": pd.DataFrame([models_row("ouro"), models_row("huginn", trained=32)]),
         "pretrained_alignment": pd.DataFrame(rows)}
    o = verdict("pretrained-stages-ouro", m)
    per_prompt = [np.median([0.8 + 0.02 * (p - t) for t in range(3)]) for p in range(4)]
    assert o.verdict == HOLDS and (o.effect, o.ci_low, o.ci_high) == bootstrap_mean(per_prompt)
    assert verdict("pretrained-stages-huginn", m).verdict == HOLDS  # Huginn: surely below 0.5, "no clear stages"
    swapped = {**m, "pretrained_alignment": pd.DataFrame(rows).replace({"family": {"ouro": "huginn",
                                                                                   "huginn": "ouro"}})}
    assert verdict("pretrained-stages-ouro", swapped).verdict == DIFFERS
    assert verdict("pretrained-stages-huginn", swapped).verdict == DIFFERS
    no_reference = {"pretrained_models": m["pretrained_models"]}
    assert "--feedforward" in verdict("pretrained-stages-ouro", no_reference).evidence


def test_extrapolation_massive_and_stand_in_rows():
    change = pd.DataFrame({"family": ["ouro"] * 3 + ["huginn"] * 3 + ["retrofit"] * 3,
                           "prompt": [0, 1, 2] * 3, "change": [0.2, 0.3, 0.25, 1e-4, 2e-4, 3e-4, 1e-5, 1e-5, 2e-5]})
    models = pd.DataFrame([models_row("ouro"), models_row("huginn", trained=32),
                           models_row("retrofit", stand_in=True)]).assign(model=["/ckpt/ouro", "/ckpt/huginn",
                                                                                 STAND_IN])
    m = {"pretrained_models": models, "pretrained_change": change}
    assert verdict("pretrained-extrapolation-ouro", m).verdict == HOLDS
    stable = verdict("pretrained-extrapolation-stable", m)
    assert stable.verdict == HOLDS and "huginn R 32→128" in stable.evidence
    assert f"retrofit (stand-in: {STAND_IN}) R 4→128" in stable.evidence  # the stand-in says so in the row's text
    assert "standing in" in stable.measured_on
    flat = {**m, "pretrained_change": change.assign(change=1e-5)}
    assert verdict("pretrained-extrapolation-ouro", flat).verdict == DIFFERS
    short = {**m, "pretrained_models": models.assign(recurrences=4)}  # R not beyond training: no extrapolation
    assert verdict("pretrained-extrapolation-ouro", short).verdict == NOT_MEASURABLE
    massive = pd.DataFrame({"family": ["retrofit"] * 3 + ["huginn"] * 3, "prompt": [0, 1, 2] * 2,
                            "massive_ratio": [900.0, 1200.0, 800.0, 9.0, 12.0, 8.0]})
    m["pretrained_massive"] = massive
    assert verdict("pretrained-massive-retrofit", m).verdict == HOLDS
    assert verdict("pretrained-massive-huginn", m).verdict == HOLDS
    m["pretrained_massive"] = massive.replace({"family": {"retrofit": "huginn", "huginn": "retrofit"}})
    assert verdict("pretrained-massive-retrofit", m).verdict == DIFFERS


def test_pretrained_rows_are_never_judged_from_a_toy():
    """Every table the toy study measures, full of looped models (the sandwich `default`, injected presets) and
    conditions / extrapolation results: not one pretrained row is judged from them."""
    toy = {"models": pd.DataFrame([{"model": "default", "preset": "default", "norm": "sandwich", "fraction_distinct":
                                    1.0, "fraction_orbit": 0.1, "fraction_slider": 0.1, "orbit_slider_cooccurrence": 0,
                                    "colsum_pearson_median": 0.9, "massive_ratio": 5.0}]),
           "conditions": pd.DataFrame([{"condition": "none", "method": "paper", "n": 5000, "fixed_point": 1.0,
                                        "non_fixed_low": 0.0, "non_fixed_high": 0.0}]),
           "extrapolate": pd.DataFrame([{"model": "default", "trained_recurrences": 4, "recurrences": 32,
                                         "fixed_point": 0.0, "successive_change": 0.5}])}
    table = judge(toy)
    pretrained = table[table["id"].isin(IDS)]
    assert list(pretrained["id"]) == IDS and set(pretrained["verdict"]) == {NOT_MEASURABLE}
    assert pretrained["effect"].isna().all()
    # only Huginn given: the Ouro and retrofit rows stay not measurable, Huginn's App. C rows are judged on Huginn
    huginn = {**toy, "pretrained_models": pd.DataFrame([models_row("huginn", trained=32)]),
              "pretrained_conditions": toy["conditions"].assign(n=10)}
    table = judge(huginn).set_index("id")
    assert table.loc["pretrained-rare-huginn", "verdict"] == INCONCLUSIVE  # 0 of 10 tokens, not of the toy's 5000
    assert table.loc["pretrained-cooccurrence-huginn", "verdict"] == NOT_MEASURABLE  # Huginn: no orbit, no slider
    assert all(table.loc[i, "verdict"] == NOT_MEASURABLE for i in IDS if "ouro" in i or "retrofit" in i)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def study(checkpoints, tmp_path_factory):
    r = checkpoints
    out = tmp_path_factory.mktemp("pretrained-out") / "report"
    from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce

    run_reproduce(ReproduceSettings(
        out=out, data=str(r / "gsm8k"), pretrained=True, quick=True, progress=False,
        looped=[f"ouro={r / 'ouro'}", f"huginn={r / 'huginn'}", f"retrofit={r / 'retrofit'}"],
        feedforward=[f"llama={r / 'llama'}"], questions=3, recurrences=40, attention_recurrences=3))
    return out


UNIT_TABLES = ("pretrained_models", "pretrained_fixed_points", "pretrained_alignment", "pretrained_change",
               "pretrained_massive", "pretrained_ablation", "pretrained_conditions",
               "pretrained_conditions_by_question")


def test_every_judged_row_recomputes_from_the_csvs(study):
    tables = study / "tables"
    claims = pd.read_csv(tables / "claims.csv", keep_default_na=False)
    assert list(claims["id"]) == IDS  # the report holds the pretrained rows only
    # every model given: every row judged (Fig. 41 only where the retrofit has massive activations: not the tiny one)
    judged = claims[claims["id"] != "pretrained-massive-causal"]
    assert NOT_MEASURABLE not in set(judged["verdict"]), judged[["id", "verdict", "evidence"]]
    m = {name: pd.read_csv(tables / f"{name}.csv") for name in UNIT_TABLES}
    again = evaluate_claims(m).set_index("id").loc[IDS]
    assert list(again["verdict"]) == list(claims["verdict"])
    assert list(again["evidence"]) == list(claims["evidence"])
    for col in ("effect", "ci_low", "ci_high"):
        got = pd.to_numeric(claims[col].replace("", np.nan)).to_numpy(dtype=float)
        np.testing.assert_allclose(again[col].to_numpy(dtype=float), got, rtol=1e-12, equal_nan=True)
    # each verdict is the effect's interval against its threshold, on the paper's side for that model
    row = claims.set_index("id").loc["pretrained-fixed-points-huginn"]
    u = m["pretrained_fixed_points"][m["pretrained_fixed_points"]["family"] == "huginn"]
    assert float(row["effect"]) == pytest.approx(u["distinct"].sum() / u["tokens"].sum())


def test_each_model_is_the_checkpoint_given_for_its_family(study, checkpoints):
    models = pd.read_csv(study / "tables" / "pretrained_models.csv").set_index("family")
    assert list(models.index) == ["ouro", "huginn", "retrofit"]
    for family in models.index:
        assert models.loc[family, "model"] == str((checkpoints / family).resolve())
        assert not bool(models.loc[family, "stand_in"]) and models.loc[family, "reference"] == "llama"
    # the published configs' own training recurrences: Ouro's total_ut_steps 4, Huginn's mean_recurrence 32, the
    # retrofit's 4 (a loader mixing the families up gets these wrong)
    assert models["trained_recurrences"].to_dict() == {"ouro": 4, "huginn": 32, "retrofit": 4}
    assert (models["recurrences"] == 40).all()
    fixed = pd.read_csv(study / "tables" / "pretrained_fixed_points.csv")
    assert fixed.groupby("family")["prompt"].nunique().to_dict() == {"huginn": 3, "ouro": 3, "retrofit": 3}
    align = pd.read_csv(study / "tables" / "pretrained_alignment.csv")
    assert set(align["recurrence"]) == {0, 1, 2} and align["pearson"].between(-1, 1).all()
    conditions = pd.read_csv(study / "tables" / "pretrained_conditions_by_question.csv")
    assert conditions["question"].nunique() == 3 and "long-persona" in set(conditions["condition"])


def test_alignment_units_are_the_prompt_s_own_profiles(study, checkpoints):
    """Prompt 1's Ouro-vs-Llama alignment recomputed from scratch: each model's stage profile of that prompt alone
    (a study that aligned the prompt-averaged profile, or another prompt's, gets other numbers)."""
    from loopscope.data.gsm8k import gsm8k_test_subset
    from loopscope.experiments.pretrained_study import alignment_by_prompt, profiles_by_prompt
    from loopscope.models.load import load_model

    question = [q["question"] for q in gsm8k_test_subset(str(checkpoints / "gsm8k"))][1]
    ouro = profiles_by_prompt(load_model(checkpoints / "ouro"), [question], 3, study / "scratch-o", False)
    llama = profiles_by_prompt(load_model(checkpoints / "llama"), [question], 1, study / "scratch-l", False)
    want = alignment_by_prompt(ouro, llama)
    align = pd.read_csv(study / "tables" / "pretrained_alignment.csv")
    got = align[(align["family"] == "ouro") & (align["prompt"] == 1)].sort_values("recurrence")
    np.testing.assert_allclose(got["pearson"].to_numpy(), want.sort_values("recurrence")["pearson"].to_numpy(),
                               rtol=1e-6)
    assert not math.isnan(float(got["pearson"].iloc[0]))


def test_rerun_resumes_every_stage_with_the_same_verdicts(study, checkpoints):
    """The same command again loads every finished stage (the checkpoints' hashes are stable keys) and judges
    the same rows."""
    from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce

    r = checkpoints
    before = pd.read_csv(study / "tables" / "claims.csv", keep_default_na=False)
    run_reproduce(ReproduceSettings(
        out=study, data=str(r / "gsm8k"), pretrained=True, quick=True, progress=False,
        looped=[f"ouro={r / 'ouro'}", f"huginn={r / 'huginn'}", f"retrofit={r / 'retrofit'}"],
        feedforward=[f"llama={r / 'llama'}"], questions=3, recurrences=40, attention_recurrences=3))
    timings = pd.read_csv(study / "tables" / "stage_timings.csv")
    assert len(timings) == 6 and set(timings["this_run"]) == {"cached"}, timings  # reference, 3 models, Fig. 41, App. C
    after = pd.read_csv(study / "tables" / "claims.csv", keep_default_na=False)
    assert after[["id", "verdict", "evidence"]].equals(before[["id", "verdict", "evidence"]])


def test_a_checkpoint_changed_in_place_is_refused_then_overwritten(tmp_path, capsys):
    """Stages are keyed by the checkpoint's file hashes, not its path: the same command after the retrofit at the
    same path was rewritten with other weights stops in one line, and --overwrite measures the new weights."""
    from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce

    write_retrofit(tmp_path / "retrofit", seed=0)
    write_gsm8k(tmp_path / "gsm8k", n_train=20)

    def run(overwrite: bool = False) -> pd.DataFrame:
        run_reproduce(ReproduceSettings(out=tmp_path / "out", data=str(tmp_path / "gsm8k"), pretrained=True,
                                        quick=True, progress=False, looped=[f"retrofit={tmp_path / 'retrofit'}"],
                                        questions=2, recurrences=16, attention_recurrences=2, overwrite=overwrite))
        return pd.read_csv(tmp_path / "out" / "tables" / "pretrained_massive.csv")

    first = run()
    assert list(first["family"]) == ["retrofit", "retrofit"]  # no feedforward, no Ouro, no Huginn: nothing else
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv").set_index("id")
    assert claims.loc["pretrained-stages-retrofit", "verdict"] == NOT_MEASURABLE  # no reference given
    write_retrofit(tmp_path / "retrofit", seed=1)
    with pytest.raises(InputError, match="checkpoint changed"):
        run()
    second = run(overwrite=True)
    assert not np.allclose(first["massive_ratio"], second["massive_ratio"])  # the new weights' own numbers
