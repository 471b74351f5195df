"""`loopscope reproduce`: the quick study end to end through the CLI (claims table first, verdicts recomputed from
the tables they came from), resuming, stage caching, summary helpers on hand-made inputs, and input errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_gsm8k
from typer.testing import CliRunner

from loopscope.cli.main import app
from loopscope.dynamics.attention_stability import attention_self_match, attention_shrink
from loopscope.errors import InputError
from loopscope.evidence import clopper_pearson
from loopscope.experiments.claims import (
    CLAIM_COLUMNS,
    CLAIMS,
    DIFFERS,
    EFFECT_ONLY,
    HOLDS,
    INCONCLUSIVE,
    NOT_MEASURABLE,
    VERDICTS,
)
from loopscope.experiments.grid import PAPER_VERDICTS
from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce
from loopscope.experiments.stage_cache import StageCache
from loopscope.stages.alignment import colsum_alignment
from loopscope.stages.repetition import stage_repeat_error

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `reproduce --quick` through the CLI; (out dir, CLI output)."""
    root = tmp_path_factory.mktemp("reproduce")
    data = write_gsm8k(root / "gsm8k")
    out = root / "out"
    result = runner.invoke(app, ["reproduce", "--quick", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, data, result.output


def read_claims(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "tables" / "claims.csv", keep_default_na=False)


def claim(table: pd.DataFrame, claim_id: str) -> pd.Series:
    return table.set_index("id").loc[claim_id]


def test_quick_report_opens_with_the_claims_table(quick_run):
    out, _, output = quick_run
    html = (out / "index.html").read_text(encoding="utf-8")
    first_table = html.index("<table")
    assert html.index("The paper&#x27;s claims against this run") < first_table
    assert html.index("Claims (id, where the paper makes it") > first_table  # caption of the first table
    assert html.index("Claims (id,") < html.index("<table", first_table + 1)
    claims = read_claims(out)
    assert list(claims.columns) == CLAIM_COLUMNS
    assert list(claims["id"]) == [c.id for c in CLAIMS]
    assert set(claims["verdict"]) <= set(VERDICTS)
    assert (claims["evidence"].str.len() > 0).all()
    assert "wrote" in output and "[1/" in output  # progress per stage


def test_quick_grid_verdicts_follow_the_grid_table(quick_run):
    """The grid rows, recomputed independently from the per-cell CSV and the paper's verdicts."""
    out, _, _ = quick_run
    every = pd.read_csv(out / "tables" / "grid_cells.csv")
    assert len(every) == 12  # 3 norms × 2 injections × block 4 × seed 0 × injected RMS {0.6325 (default), 1}
    cells = every[every["injected_rms"] == 0.6325]  # the verdict is the default setting's
    claims = read_claims(out)
    for claim_id, injected in (("grid-injection", True), ("grid-no-injection", False)):
        assert "D=64, injected RMS 1:" in claim(claims, claim_id)["evidence"]  # the other setting is reported
        part = cells[(cells["injection"] != "none") == injected]
        verdicts = []
        for (n, i), group in part.groupby(["norm", "injection"]):  # the share of cells with the paper's verdict
            lo, hi = clopper_pearson(int((group["verdict"] == PAPER_VERDICTS[(n, i)]).sum()), len(group))
            verdicts.append(HOLDS if lo > 0.5 else DIFFERS if hi < 0.5 else INCONCLUSIVE)
        expected = HOLDS if set(verdicts) == {HOLDS} else DIFFERS if DIFFERS in verdicts else INCONCLUSIVE
        assert claim(claims, claim_id)["verdict"] == expected
    assert claim(claims, "grid-block-size")["verdict"] == NOT_MEASURABLE  # one block size in quick mode


def test_quick_model_verdicts_follow_the_per_model_tables(quick_run):
    out, _, _ = quick_run
    models = pd.read_csv(out / "tables" / "claims_models.csv", keep_default_na=False, na_values=[""])
    presets = ["micro", "micro+inject", "micro+noprelude", "micro+sandwich"]
    assert set(models["model"]) == {f"{p}-s{seed}" for p in presets for seed in (0, 1)} | {"default"}
    assert models.set_index("model").loc["micro+inject-s1", "seed"] == 1 and pd.isna(
        models.set_index("model").loc["default", "seed"])
    claims = read_claims(out)
    # the paired rules, recomputed from the per-model columns: one effect per seed, a t-interval over the 2 seeds
    from loopscope.evidence import seed_interval

    by = models.set_index("model")
    for claim_id, variant, effect in (
            ("noprelude-worse", "noprelude", lambda b, v: b["colsum_pearson_median"] - v["colsum_pearson_median"]),
            ("sandwich-no-stages", "sandwich", lambda b, v: b["colsum_pearson_median"] - v["colsum_pearson_median"])):
        values = [effect(by.loc[f"micro-s{seed}"], by.loc[f"micro+{variant}-s{seed}"]) for seed in (0, 1)]
        mean, lo, hi = seed_interval(values)
        row = claim(claims, claim_id)
        assert float(row["effect"]) == pytest.approx(mean) and float(row["ci_low"]) == pytest.approx(lo)
        assert row["verdict"] == (HOLDS if lo > 0 else DIFFERS if hi < 0 else "inconclusive")
        assert row["figure"]  # every row says where the report shows it
    # Prop. 4.2's bound is a theorem: measured/bound ≤ 1 in every model, and the checks table says so
    assert models["prop42_max_ratio"].notna().all() and (models["prop42_max_ratio"] <= 1).all()
    checks = pd.read_csv(out / "tables" / "checks.csv", keep_default_na=False)
    assert claim(checks, "prop-4.2-bound")["verdict"] == HOLDS and "prop-4.1" in set(checks["id"])
    # its claim row is the empirical relation, recomputed here from the per-model columns
    lo, hi = models["prop42_spearman_lo"], models["prop42_spearman_hi"]
    expected = HOLDS if (lo > 0.5).all() else DIFFERS if (hi < 0.5).any() else "inconclusive"
    assert claim(claims, "prop-4.2")["verdict"] == expected
    for name in models["model"]:  # the summary row is the model's own analysis, not another model's
        row = models.set_index("model").loc[name]
        deg = pd.read_csv(out / "models" / name / "tables" / "degeneracy_summary.csv").iloc[0]
        assert row["fraction_distinct"] == pytest.approx(deg["fraction_distinct_cyclic"])
        prop42 = pd.read_csv(out / "models" / name / "tables" / "prop42_summary.csv")
        assert row["prop42_max_ratio"] == pytest.approx(prop42["max_ratio"].max())
        check = pd.read_csv(out / "models" / name / "tables" / "cyclic_fixed_point_check.csv")
        assert row["max_final_relative_change"] == pytest.approx(check["final_relative_change"].max())
    # the per-model rules, recomputed: per preset trained here, a margin per seed and its t-interval over seeds;
    # the builtin (no seed) is listed, not judged
    import math

    def per_preset(rows, margin):
        verdicts = []
        for _, group in rows[rows["seed"].notna()].groupby("preset"):
            _, lo, hi = seed_interval([margin(x) for x in group.iloc[:, -1]])
            verdicts.append(HOLDS if lo > 0 else DIFFERS if hi < 0 else "inconclusive")
        return HOLDS if all(v == HOLDS for v in verdicts) else DIFFERS if DIFFERS in verdicts else "inconclusive"

    injected = models[models["injection"] != "none"][["preset", "seed", "fraction_distinct"]]
    assert claim(claims, "cyclic-fixed-point")["verdict"] == per_preset(injected, lambda x: x - 0.5)
    change = models[["preset", "seed", "max_final_relative_change"]]
    expected = per_preset(change, lambda x: math.log10(1e-2) - math.log10(max(x, 1e-12)))
    assert claim(claims, "settle")["verdict"] == expected
    pretrained = claims[claims["id"].str.startswith("pretrained-")]  # no toy ever stands in for a pretrained model
    assert len(pretrained) >= 13 and set(pretrained["verdict"]) == {NOT_MEASURABLE}


def test_quick_extrapolation_and_condition_verdicts_follow_their_tables(quick_run):
    out, _, _ = quick_run
    claims = read_claims(out)
    per_r = pd.read_csv(out / "tables" / "extrapolate_per_r.csv")
    # extrapolation runs the first seed's models (named by their checkpoints' preset) and the builtin
    assert set(per_r["model"]) == {"micro", "micro+inject", "micro+noprelude", "micro+sandwich", "default"}
    assert set(per_r["recurrences"]) == {1, 2, 4, 8}
    at_max = per_r[per_r["recurrences"] == 8].set_index("model")
    converging = at_max.index[at_max["fixed_point"] > 0.5]
    if len(converging) == 0:
        assert claim(claims, "extrapolation-stable")["verdict"] == NOT_MEASURABLE
        assert claim(claims, "extrapolation-unstable")["verdict"] in (HOLDS, DIFFERS)
    else:
        assert claim(claims, "extrapolation-stable")["verdict"] in (HOLDS, DIFFERS)
    conditions = pd.read_csv(out / "tables" / "conditions.csv")
    paper = conditions[conditions["method"] == "paper"].set_index("condition")
    assert set(paper.index) == {"none", "long-persona", "long-persona-padded", "short-math"}
    none = paper.loc["none"]
    k = round(none["n"] * (1 - none["fixed_point"]))
    cp_lo, cp_hi = clopper_pearson(int(k), int(none["n"]))
    lo, hi = min(cp_lo, none["non_fixed_low"]), max(cp_hi, none["non_fixed_high"])
    expected = HOLDS if hi < 0.0014 else DIFFERS if lo > 0.0014 else INCONCLUSIVE
    rare = claim(claims, "rare-non-fixed")
    assert rare["verdict"] == expected and float(rare["ci_high"]) == pytest.approx(hi)
    # the persona row's paired difference, recomputed from the per-question counts
    q = pd.read_csv(out / "tables" / "conditions_by_question.csv")
    q = q[q["method"] == "paper"].set_index(["condition", "question"])
    persona = claim(claims, "persona")
    diff = (q.loc["long-persona", "non_fixed"].sum() / q.loc["long-persona", "n"].sum()
            - q.loc["none", "non_fixed"].sum() / q.loc["none", "n"].sum())
    if q["non_fixed"].sum() == 0:
        assert persona["verdict"] == NOT_MEASURABLE
    else:
        assert float(persona["effect"]) == pytest.approx(diff)
        assert float(persona["ci_low"]) <= diff <= float(persona["ci_high"])


def test_quick_massive_ablation_follows_its_tables(quick_run):
    """The ablation stage zeroes the onset MLP of the pre-norm micro model with the largest massive-activation
    ratio and of SmolLM2 (real weights); SmolLM2's massive activations (peak/median ~10^4) collapse when its
    onset MLP is zeroed, and the claim row is judged on the looped row only."""
    out, _, _ = quick_run
    summary = pd.read_csv(out / "tables" / "massive_ablation_summary.csv").set_index("model")
    models = pd.read_csv(out / "tables" / "claims_models.csv").set_index("model")
    pre = models[(models["norm"] == "pre") & models.index.str.startswith("micro")]
    assert list(summary.index) == [pre["massive_ratio"].idxmax(), "smollm2"]
    smol = summary.loc["smollm2"]
    assert smol["kind"] == "feedforward-hf" and smol["recurrences"] == 1
    assert smol["massive_ratio_before"] > 1000 and smol["massive_ratio_after"] < smol["massive_ratio_before"] / 5
    assert smol["sink_rate_kept"] == pytest.approx(smol["sink_rate_after"] / smol["sink_rate_before"])
    looped = summary.iloc[0]
    assert looped["kind"] == "looped" and looped["recurrences"] == 4
    row = claim(read_claims(out), "massive-causal")
    if looped["massive_ratio_before"] < 100:
        assert row["verdict"] == NOT_MEASURABLE
    else:  # no threshold fixed before data: the effect (the larger kept fraction), no verdict
        assert row["verdict"] == EFFECT_ONLY
        kept = np.nanmax([looped["sink_rate_kept"], looped["colsum_concentration_kept"]])
        assert float(row["effect"]) == pytest.approx(kept)
    assert (out / "figures" / "massive_ablation_smollm2.png").stat().st_size > 1000


def test_quick_training_section(quick_run):
    out, _, _ = quick_run
    metrics = pd.read_csv(out / "tables" / "training_metrics.csv")
    presets = ["micro", "micro+inject", "micro+noprelude", "micro+sandwich", "micro-feedforward"]
    assert list(metrics["preset"]) == presets * 2  # every preset once per seed
    assert (metrics["steps"] == 12).all()
    assert (out / "figures" / "training_loss.png").stat().st_size > 1000
    for seed in (0, 1):
        assert (out / "runs" / f"micro-s{seed}" / "model" / "config.json").exists()
    # the seeds are different models: same preset, different initialisation and batch order
    assert metrics["heldout_loss"].iloc[0] != metrics["heldout_loss"].iloc[len(presets)]


def test_quick_resume_loads_finished_stages(quick_run):
    """A rerun loads every finished stage; a stage whose results were lost (no done.json) is recomputed, the grid
    from its own cells CSV without running a cell again; the claims come out the same."""
    out, data, _ = quick_run
    before = read_claims(out)
    (out / "stages" / "grid" / "done.json").unlink()
    cells_before = pd.read_csv(out / "stages" / "grid" / "cells" / "grid_cells.csv")
    index = run_reproduce(ReproduceSettings(out=out, data=str(data), quick=True, progress=False))
    assert index == out / "index.html"
    timings = pd.read_csv(out / "tables" / "stage_timings.csv").set_index("stage")
    assert timings.loc["grid", "this_run"] == "ran"
    ran = timings[timings["this_run"] == "ran"].index.tolist()
    assert ran == ["grid"], ran
    assert timings.loc["train-micro-s1", "this_run"] == "cached"
    assert len(pd.read_csv(out / "stages" / "grid" / "cells" / "grid_cells.csv")) == len(cells_before)
    pd.testing.assert_frame_equal(read_claims(out), before)
    with pytest.raises(InputError, match="other settings"):  # a finished stage is never mixed with new settings
        run_reproduce(ReproduceSettings(out=out, data=str(data), quick=True, minutes_per_model=0.05, progress=False))


def test_missing_data_is_an_input_error(tmp_path, capsys, monkeypatch):
    from loopscope.cli.main import main

    monkeypatch.setattr("sys.argv", ["loopscope", "reproduce", "--quick", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()  # the entry point prints the one-line error and exits 2
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(InputError, match="nowhere"):
        run_reproduce(ReproduceSettings(out=tmp_path / "o", data=str(tmp_path / "nowhere"), quick=True))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(InputError, match="train"):
        run_reproduce(ReproduceSettings(out=tmp_path / "o", data=str(tmp_path / "half"), quick=True))


def test_help_reads_like_a_man_page():
    result = runner.invoke(app, ["reproduce", "--help"])
    assert result.exit_code == 0
    for heading in ("SYNOPSIS", "DESCRIPTION", "RESUMING", "FILES", "EXAMPLES", "--minutes-per-model", "--quick"):
        assert heading in result.output


def test_stage_cache_round_trip(tmp_path):
    cache = StageCache(tmp_path)
    index = pd.MultiIndex.from_product([range(2), range(3)], names=["recurrence", "layer"])
    square = pd.DataFrame(np.arange(36.0).reshape(6, 6), index=index, columns=index.copy())
    labels = pd.DataFrame({"behaviour": pd.array(["orbit", "fixed_point"], dtype="string"),
                           "period": pd.array([3, None], dtype="Int64")})
    labels.attrs["all_tokens"] = pd.DataFrame({"n": [1, 2]})  # as run_conditions attaches its all-token table
    assert cache.load("s", {"a": 1}) is None
    cache.save("s", {"a": (1, 2)}, {"square": square, "labels": labels, "nothing": None}, 1.5)
    back = cache.load("s", {"a": (1, 2)})
    assert set(back) == {"square", "labels"}
    pd.testing.assert_frame_equal(back["square"], square)
    pd.testing.assert_frame_equal(back["labels"], labels)
    pd.testing.assert_frame_equal(back["labels"].attrs["all_tokens"], labels.attrs["all_tokens"])
    assert cache.seconds("s") == 1.5
    with pytest.raises(InputError, match=r"settings \(a\)"):
        cache.load("s", {"a": (1, 3)})
    # a setting added to the code later, left off (None), still finds the finished stage; set, it does not
    assert set(cache.load("s", {"a": (1, 2), "new_option": None})) == {"square", "labels"}
    with pytest.raises(InputError, match=r"settings \(new_option\)"):
        cache.load("s", {"a": (1, 2), "new_option": 3})


def test_attention_self_match_and_shrink_by_hand():
    index = pd.MultiIndex.from_product([range(3), range(2)], names=["recurrence", "layer"])
    layer = index.get_level_values("layer").to_numpy()
    rec = index.get_level_values("recurrence").to_numpy()
    banded = np.where(layer[:, None] == layer[None, :], 0.1, 1.0) + 0.01 * np.abs(rec[:, None] - rec[None, :])
    assert attention_self_match(pd.DataFrame(banded, index=index, columns=index)) == 1.0
    swapped = np.where(layer[:, None] == layer[None, :], 1.0, 0.1)  # every pattern nearest to the other layer
    assert attention_self_match(pd.DataFrame(swapped, index=index, columns=index)) == 0.0
    to_last = pd.DataFrame({"recurrence": [0, 0, 1, 1, 2, 2], "layer": [0, 1] * 3,
                            "attention_frobenius_mean": [2.0, 4.0, 0.3, 0.3, 0.0, 0.0]})
    assert attention_shrink(to_last) == pytest.approx(0.1)
    assert math.isnan(attention_shrink(to_last[to_last.recurrence < 2]))


def test_stage_repeat_error_and_alignment_by_hand():
    rows = [dict(segment="prelude", recurrence=-1, layer=0, v=0.0)]
    profile = [0.2, 0.8]
    for t in range(4):
        for j, v in enumerate(profile):
            rows.append(dict(segment="core", recurrence=t, layer=j, v=v + (0.5 if t == 0 else 0.0)))
    rows.append(dict(segment="coda", recurrence=-1, layer=0, v=1.0))
    stages = pd.DataFrame(rows)
    assert stage_repeat_error(stages, "v") == 0.0  # pass 0 is the transient; passes 1, 2 repeat pass 3
    stages.loc[(stages.segment == "core") & (stages.recurrence == 1) & (stages.layer == 0), "v"] += 0.4
    spread = stages["v"].std(ddof=0)
    assert stage_repeat_error(stages, "v") == pytest.approx(math.sqrt(0.4 ** 2 / 4) / spread)
    alignment = pd.DataFrame({"metric": ["colsum_concentration"] * 3 + ["sink_rate"] * 3,
                              "recurrence": [0, 1, 2] * 2, "pearson": [0.1, 0.3, 0.9, -1, -1, -1]})
    got = colsum_alignment(alignment)
    assert got == pytest.approx({"colsum_pearson_median": 0.3, "colsum_pearson_last": 0.9,
                                 "colsum_pearson_early": 0.2})
