"""The retrofit study (`experiments.retrofit_study`, rules in `experiments.retrofit_claims`): verdicts from intervals on
hand-made tables, the summaries by hand, and the whole `reproduce --retrofit-only` pipeline on small models (the
trained builtin `default` as the looped model, a tiny Llama as its base) with every claim row recomputed from the
CSVs the report wrote."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from loopscope.experiments.claims import DIFFERS, HOLDS, INCONCLUSIVE, NOT_MEASURABLE, Thresholds, evaluate_claims, side
from loopscope.experiments.retrofit_claims import RETROFIT_CLAIMS
from loopscope.experiments.retrofit_study import (
    RetrofitPlan,
    alignment_summary,
    extrapolation_summary,
    fixed_point_summary,
    fixed_points_by_prompt,
    majority_rate,
    task_rows,
)

TH = Thresholds()


def verdict(claim_id: str, m: dict) -> str:
    return next(c.rule for c in RETROFIT_CLAIMS if c.id == claim_id)(m, TH).verdict


def test_side_needs_the_whole_interval_past_the_threshold():
    assert side(0.51, 0.9, 0.5) == HOLDS and side(0.1, 0.49, 0.5) == DIFFERS
    assert side(0.4, 0.6, 0.5) == INCONCLUSIVE and side(0.5, 0.7, 0.5) == INCONCLUSIVE  # touching is not past
    assert side(-0.3, -0.1, -0.05, above_holds=False) == HOLDS and side(math.nan, 1, 0) == NOT_MEASURABLE


def summary_row(**kw) -> pd.DataFrame:
    row = dict(model="m", fraction_converged=0.9, fraction_converged_lo=0.8, fraction_converged_hi=0.95,
               fraction_distinct=0.8, fraction_distinct_lo=0.7, fraction_distinct_hi=0.9, tokens=500, prompts=16,
               recurrences=128, alignment_median=0.7, alignment_lo=0.6, alignment_hi=0.8, alignment_last=0.75,
               passes=8, stage_repeat_error=0.1, attention_self_match=1.0, attention_shrink=0.1, massive_ratio=900.0)
    row.update(kw)
    return pd.DataFrame([row])


def alignment_units(per_prompt: list[float], passes: int = 8) -> pd.DataFrame:
    """Per (prompt, pass) Pearson r: each prompt's passes spread ±0.01 around its value."""
    return pd.DataFrame([{"prompt": i, "recurrence": t, "pearson": r + 0.01 * ((t % 3) - 1)}
                         for i, r in enumerate(per_prompt) for t in range(passes)])


def test_stage_and_attention_intervals_resample_prompts_an_outlier_prompt_widens_them():
    """Eight prompts at r = 0.7: a tight interval above 0.5 (holds). One outlier prompt (r = −0.5, all its passes)
    widens the interval past 0.5 (inconclusive), far wider than resampling the 64 (prompt, pass) values as if
    passes were trials would make it. Likewise one prompt whose patterns never match their own layer."""
    from loopscope.evidence import bootstrap_mean

    rule = {c.id: c.rule for c in RETROFIT_CLAIMS}
    clean = {"retrofit": summary_row(), "retrofit_alignment_by_prompt": alignment_units([0.7] * 8)}
    outlier = {**clean, "retrofit_alignment_by_prompt": alignment_units([0.7] * 7 + [-0.5])}
    a, b = rule["retrofit-stages"](clean, Thresholds()), rule["retrofit-stages"](outlier, Thresholds())
    assert a.verdict == HOLDS and b.verdict == INCONCLUSIVE
    assert (b.ci_high - b.ci_low) > 10 * (a.ci_high - a.ci_low)
    flat = bootstrap_mean(outlier["retrofit_alignment_by_prompt"]["pearson"].to_numpy())
    assert (b.ci_high - b.ci_low) > 1.5 * (flat[2] - flat[1]), (b, flat)  # (prompt, pass) values: too narrow
    att = {"retrofit": summary_row(), "retrofit_attention_by_prompt":
           pd.DataFrame({"prompt": range(8), "self_match": [1.0] * 7 + [0.0]})}
    assert rule["retrofit-attention"](att, Thresholds()).verdict == INCONCLUSIVE


def test_fixed_point_and_stage_rows_follow_their_intervals():
    assert verdict("retrofit-fixed-points", {"retrofit": summary_row()}) == HOLDS
    assert verdict("retrofit-fixed-points", {"retrofit": summary_row(fraction_distinct_lo=0.3)}) == INCONCLUSIVE
    assert verdict("retrofit-fixed-points", {"retrofit": summary_row(fraction_distinct_lo=0.1,
                                                                    fraction_distinct_hi=0.4)}) == DIFFERS
    # stages and attention are judged on prompts only: passes and patterns of one model are not independent trials
    assert verdict("retrofit-stages", {"retrofit": summary_row()}) == INCONCLUSIVE
    assert verdict("retrofit-attention", {"retrofit": summary_row(attention_patterns=64)}) == INCONCLUSIVE
    units = {"retrofit": summary_row(), "retrofit_alignment_by_prompt": alignment_units([0.7] * 8),
             "retrofit_attention_by_prompt": pd.DataFrame({"prompt": range(8), "self_match": [1.0] * 7 + [0.95]})}
    assert verdict("retrofit-stages", units) == HOLDS
    assert verdict("retrofit-attention", units) == HOLDS
    low = {**units, "retrofit_alignment_by_prompt": alignment_units([0.3] * 8),
           "retrofit_attention_by_prompt": pd.DataFrame({"prompt": range(8), "self_match": [0.5] * 8})}
    assert verdict("retrofit-stages", low) == DIFFERS and verdict("retrofit-attention", low) == DIFFERS
    # every row with an interval carries it in the effect columns
    rule = next(c.rule for c in RETROFIT_CLAIMS if c.id == "retrofit-fixed-points")
    v = rule({"retrofit": summary_row()}, Thresholds())
    assert (v.effect, v.ci_low, v.ci_high) == (0.8, 0.7, 0.9)
    assert verdict("retrofit-fixed-points", {}) == NOT_MEASURABLE


def per_r(losses: dict[int, list[float]], trained: int = 4) -> pd.DataFrame:
    loss = pd.DataFrame([{"model": m, "recurrences": R, "text": i, "loss_sum": v * 10, "targets": 10}
                         for m, table in (("base", {1: losses[1]}), ("looped", losses))
                         for R, vals in table.items() for i, v in enumerate(vals)])
    acc = pd.DataFrame([{"model": m, "recurrences": R, "question": q, "correct": int(q % 2 == 0), "chance": 0.2}
                        for m, rs in (("base", [1]), ("looped", list(losses))) for R in rs for q in range(6)])
    return extrapolation_summary(loss, acc, {"looped": trained})


def test_extrapolation_summary_by_hand():
    t = per_r({1: [3.0, 3.2, 2.8], 4: [2.0, 2.4, 2.0], 32: [2.02, 2.41, 2.01]})
    row = t[(t.model == "looped") & (t.recurrences == 4)].iloc[0]
    assert row.loss == pytest.approx(6.4 / 3) and row.trained_recurrences == 4 and bool(row.looped)
    assert row.loss_minus_r1 == pytest.approx(np.mean([-1.0, -0.8, -0.8]))  # paired over texts
    assert row.loss_minus_r1_lo <= row.loss_minus_r1 <= row.loss_minus_r1_hi
    assert row.accuracy == pytest.approx(0.5) and row.chance == 0.2
    assert not bool(t[t.model == "base"].iloc[0].looped)
    assert verdict("retrofit-loop-used", {"retrofit_extrapolate": t}) == HOLDS
    far = t[(t.model == "looped") & (t.recurrences == 32)].iloc[0]
    assert far.loss_minus_trained == pytest.approx(np.mean([0.02, 0.01, 0.01]))
    assert verdict("retrofit-extrapolation", {"retrofit_extrapolate": t}) == HOLDS  # +0.013 nats: flat
    blown = per_r({1: [3.0, 3.2, 2.8], 4: [2.0, 2.4, 2.0], 32: [8.0, 9.0, 8.5]})
    assert verdict("retrofit-extrapolation", {"retrofit_extrapolate": blown}) == DIFFERS
    short = per_r({1: [3.0, 3.2, 2.8], 4: [2.0, 2.4, 2.0], 16: [2.0, 2.4, 2.0]})
    assert verdict("retrofit-extrapolation", {"retrofit_extrapolate": short}) == NOT_MEASURABLE  # 16 < 8 × 4
    unused = per_r({1: [2.0, 2.4, 2.0], 4: [2.01, 2.38, 2.02], 32: [2.0, 2.4, 2.0]})
    assert verdict("retrofit-loop-used", {"retrofit_extrapolate": unused}) == DIFFERS


def test_fixed_points_by_prompt_and_interval():
    deg = pd.DataFrame({"batch": [0, 0, 0, 1, 1, 2], "token": [0, 1, 2, 0, 1, 0],
                        "verdict": ["distinct cyclic fixed point", "no fixed point", "degenerate fixed point",
                                    "distinct cyclic fixed point", "distinct cyclic fixed point", "no fixed point"]})
    by = fixed_points_by_prompt(deg)
    assert by[["tokens", "converged", "distinct"]].to_numpy().tolist() == [[3, 2, 1], [2, 2, 2], [1, 0, 0]]
    s = fixed_point_summary(by)
    assert s["fraction_converged"] == pytest.approx(4 / 6) and s["fraction_distinct"] == pytest.approx(3 / 6)
    assert s["fraction_distinct_lo"] < 0.5 < s["fraction_distinct_hi"] and s["prompts"] == 3
    a = alignment_summary(pd.DataFrame({"metric": "colsum_concentration", "recurrence": range(5),
                                        "pearson": [0.1, 0.9, 0.8, 0.7, 0.6]}))
    assert a["alignment_median"] == pytest.approx(0.7) and a["alignment_last"] == pytest.approx(0.6)
    assert a["alignment_lo"] <= 0.7 <= a["alignment_hi"]


def test_task_rows_are_one_digit_sums_with_a_stated_chance():
    rows = task_rows(40, seed=3)
    for r in rows:
        a, op, b = r["expression"].split()
        assert len(a) == len(b) == 1 and op in "+-"
        assert r["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
    counts = pd.Series([r["answer"] for r in rows]).value_counts()
    assert majority_rate(rows) == counts.iloc[0] / 40 and majority_rate(rows) < 0.3
    assert task_rows(40, seed=3) == rows


@pytest.fixture(scope="module")
def retrofit_run(tmp_path_factory):
    from conftest import write_gsm8k
    from transformers import LlamaConfig, LlamaForCausalLM

    from loopscope.data.tokenizer import load_tokenizer
    from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce

    root = tmp_path_factory.mktemp("retrofit")
    base = root / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(base)
    load_tokenizer().save_pretrained(base)
    plan = RetrofitPlan(model="default", base=str(base), prompts=2, recurrences=12, attention_recurrences=3,
                        extrapolate=(1, 2, 4, 32), task_questions=4, certificate_tokens=4)
    out = root / "out"
    run_reproduce(ReproduceSettings(out=out, data=str(write_gsm8k(root / "gsm8k", n_train=20)), retrofit_only=True,
                                    retrofit_plan=plan, progress=False))
    return out


def test_retrofit_claims_recompute_from_their_csvs(retrofit_run):
    tables = retrofit_run / "tables"
    claims = pd.read_csv(tables / "claims.csv", keep_default_na=False)
    assert list(claims["id"]) == [c.id for c in RETROFIT_CLAIMS]
    m = {"retrofit": pd.read_csv(tables / "retrofit_summary.csv"),
         "retrofit_ablation": pd.read_csv(tables / "retrofit_ablation.csv"),
         "retrofit_extrapolate": pd.read_csv(tables / "retrofit_extrapolate.csv"),
         "retrofit_alignment_by_prompt": pd.read_csv(tables / "retrofit_alignment_by_prompt.csv"),
         "retrofit_attention_by_prompt": pd.read_csv(tables / "retrofit_attention_by_prompt.csv")}
    again = evaluate_claims(m).set_index("id").loc[claims["id"]]
    assert list(again["verdict"]) == list(claims["verdict"])
    assert list(again["evidence"]) == list(claims["evidence"])
    assert (claims["verdict"] != NOT_MEASURABLE).sum() >= 4  # the small run measures most rows
    ex = m["retrofit_extrapolate"]
    assert sorted(ex[ex.looped].recurrences) == [1, 2, 4, 32] and ex[~ex.looped].recurrences.tolist() == [1]
    assert (ex["trained_recurrences"][ex.looped] == 4).all()  # the default model's own R


def test_retrofit_loss_is_the_model_s_own(retrofit_run):
    """The table's R = 4 loss of `default` recomputed directly on the held-out texts."""
    from loopscope.experiments.heal import encode_texts, heldout_texts, pooled_loss, text_losses
    from loopscope.models.load import load_model

    loaded = load_model("default")
    data = retrofit_run.parent / "gsm8k"
    want = pooled_loss(text_losses(loaded.model, encode_texts(heldout_texts(str(data)), loaded.tokenizer), 4))
    ex = pd.read_csv(retrofit_run / "tables" / "retrofit_extrapolate.csv")
    got = ex[(ex.model == "default") & (ex.recurrences == 4)]["loss"].iloc[0]
    assert got == pytest.approx(want, rel=1e-6)
