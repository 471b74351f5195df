"""Verdict rules of `experiments.claims` on hand-made tables: each rule's holds / differs / not-measurable cases,
with the threshold edges, so a rule that compares the wrong way or reads the wrong column fails here."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from loopscope.experiments import claims
from loopscope.experiments.claims import CHECKS, CLAIMS, INCONCLUSIVE, DIFFERS, HOLDS, NOT_MEASURABLE, Thresholds, evaluate_claims

TH = Thresholds()


def model(name: str, **kw) -> dict:
    """A converged, distinct, well-aligned pre-norm base model; override any column."""
    base, _, variant = name.partition("+")
    row = dict(model=name, base=base, variant=variant, norm="pre",
               injection="concat" if "inject" in variant else "none",
               n_prelude=0 if "noprelude" in variant else 2, block_size=4, trained_recurrences=4, recurrences=64,
               last_layer_relative_change=1e-5, max_final_relative_change=2e-5, last_layer_worst_token_change=2e-5,
               worst_token_change=4e-5, fraction_distinct=0.9,
               fraction_degenerate=0.0, fraction_no_fixed_point=0.1, min_cosine_to_first=0.5, fraction_fixed_point=0.95,
               fraction_orbit=0.0, fraction_slider=0.0, fraction_divergent=0.0, fraction_unknown=0.05,
               orbit_slider_cooccurrence=0, attention_self_match=1.0, attention_shrink=0.1, prop42_max_ratio=0.01,
               stage_repeat_error=0.05, colsum_pearson_median=0.8, colsum_pearson_last=0.8, colsum_pearson_early=0.8,
               massive_ratio=100.0)
    row.update(kw)
    return row


def models(*rows: dict) -> dict[str, pd.DataFrame]:
    return {"models": pd.DataFrame(list(rows))}


def verdict(claim_id: str, m: dict, th: Thresholds = TH) -> str:
    rule = next(c.rule for c in [*CLAIMS, *CHECKS] if c.id == claim_id)
    return rule(m, th).verdict


def test_every_claim_not_measurable_without_tables():
    table = evaluate_claims({})
    assert list(table.columns) == claims.CLAIM_COLUMNS
    assert list(table["id"]) == [c.id for c in CLAIMS]
    assert set(table["verdict"]) == {NOT_MEASURABLE}
    assert len(set(table["id"])) == len(table)


def trained(name: str, column: str, values: list[float], **kw) -> list[dict]:
    """One row per seed of preset `name` (its `preset` column set), column = values[seed]."""
    return [model(name, preset=name, seed=i, **{column: v}, **kw) for i, v in enumerate(values)]


def test_settle_is_judged_per_preset_over_seeds():
    col = "max_final_relative_change"
    good = trained("a", col, [1e-5, 2e-5, 1e-5])
    assert verdict("settle", models(*good)) == HOLDS
    bad = trained("b", col, [0.05, 0.08, 0.06])
    assert verdict("settle", models(*good, *bad)) == DIFFERS  # one preset surely above 1 %
    edge = trained("c", col, [1e-3, 0.2, 1e-2])  # the seeds disagree: the interval straddles the threshold
    assert verdict("settle", models(*good, *edge)) == INCONCLUSIVE
    assert verdict("settle", models(model("a", max_final_relative_change=1e-5))) == INCONCLUSIVE  # one model
    # a builtin (no seed) beside trained presets is listed, not judged
    v = next(c.rule for c in CLAIMS if c.id == "settle")(models(*good, model("default", seed=math.nan,
                                                                             max_final_relative_change=0.5)), TH)
    assert v.verdict == HOLDS and "not judged (one model, no seeds): default 0.5" in v.evidence
    assert v.effect == pytest.approx((3 + (3 - math.log10(2)) + 3) / 3)  # mean of log10(1e-2 / change) over seeds
    assert verdict("settle", models(model("a", max_final_relative_change=math.nan))) == NOT_MEASURABLE


def test_injection_cyclic_reads_only_injection_models():
    m = models(*trained("l4", "fraction_distinct", [0.0, 0.0, 0.0]),
               *trained("l4+inject", "fraction_distinct", [0.6, 0.62, 0.61]))
    assert verdict("cyclic-fixed-point", m) == HOLDS  # the no-injection model is not judged
    m = models(*trained("l4+inject", "fraction_distinct", [0.45, 0.44, 0.46]))  # surely not more than half
    assert verdict("cyclic-fixed-point", m) == DIFFERS
    assert verdict("cyclic-fixed-point", models(model("l4"))) == NOT_MEASURABLE


def seeded(name: str, values: list[dict]) -> list[dict]:
    """One row per seed of the same preset, the i-th with columns values[i]."""
    return [model(name, seed=i, **kw) for i, kw in enumerate(values)]


def test_injection_helps_compares_with_its_own_base_seed_by_seed():
    base = seeded("l4", [dict(last_layer_relative_change=1e-2)] * 3)
    better = seeded("l4+inject", [dict(last_layer_relative_change=x) for x in (1e-6, 1e-5, 1e-6)])
    rule = next(c.rule for c in CLAIMS if c.id == "injection-helps")
    v = rule(models(*base, *better), TH)
    assert v.verdict == HOLDS
    assert v.effect == pytest.approx((4 + 3 + 4) / 3) and v.ci_low > 0  # orders of magnitude, t-interval over seeds
    worse = seeded("l4+inject", [dict(last_layer_relative_change=x) for x in (1e-1, 2e-1, 1e-1)])
    assert verdict("injection-helps", models(*base, *worse)) == DIFFERS
    mixed = seeded("l4+inject", [dict(last_layer_relative_change=x) for x in (1e-6, 1e-1, 1e-2)])
    assert verdict("injection-helps", models(*base, *mixed)) == INCONCLUSIVE  # the interval straddles 0
    one = models(model("l4", seed=0, last_layer_relative_change=1e-2), model("l4+inject", seed=0,
                                                                             last_layer_relative_change=1e-6))
    assert verdict("injection-helps", one) == INCONCLUSIVE  # one seed: no interval, however large the effect
    crossed = models(*base[:1], *better[1:2])  # seed 0 base against seed 1 variant: not a matched pair
    assert verdict("injection-helps", crossed) == NOT_MEASURABLE
    m = models(model("l8", last_layer_relative_change=1e-2), model("l4+inject"))  # no l4 to compare with
    assert verdict("injection-helps", m) == NOT_MEASURABLE


def test_distinct_and_degenerate():
    assert verdict("distinct", models(*trained("a", "min_cosine_to_first", [0.98, 0.97, 0.975]))) == HOLDS
    assert verdict("distinct", models(*trained("a", "min_cosine_to_first", [0.995, 0.999, 0.997]))) == DIFFERS


def test_prop41_only_judges_converged_models():
    m = models(model("a", last_layer_worst_token_change=1e-4, worst_token_change=5e-3),
               model("b", last_layer_worst_token_change=0.5, worst_token_change=0.9))  # b: premise false
    assert verdict("prop-4.1", m) == HOLDS
    m = models(model("a", last_layer_worst_token_change=1e-4, worst_token_change=0.02))
    assert verdict("prop-4.1", m) == DIFFERS
    assert verdict("prop-4.1", models(model("b", last_layer_worst_token_change=0.5))) == NOT_MEASURABLE


def test_prop41_reads_the_worst_token_not_the_mean():
    """One token of many still moving at layer 0: the mean over tokens is tiny, the worst token is not; Prop. 4.1
    ("every layer has converged") is about every token, so the row must differ."""
    m = models(model("a", last_layer_relative_change=1e-5, max_final_relative_change=2e-4,
                     last_layer_worst_token_change=1e-4, worst_token_change=0.3))
    assert verdict("prop-4.1", m) == DIFFERS


def test_attention_needs_both_bands_and_shrinking():
    def seeds(**columns):  # three seeds of preset "a", column c = columns[c][seed]
        return models(*[model("a", preset="a", seed=i, **{c: v[i] for c, v in columns.items()}) for i in range(3)])

    good = dict(attention_self_match=[1.0, 0.95, 0.97], attention_shrink=[0.1, 0.12, 0.08])
    assert verdict("attention-stabilises", seeds(**good)) == HOLDS
    assert verdict("attention-stabilises", seeds(**{**good, "attention_self_match": [0.8, 0.82, 0.78]})) == DIFFERS
    assert verdict("attention-stabilises", seeds(**{**good, "attention_shrink": [0.9, 0.85, 0.95]})) == DIFFERS
    assert verdict("attention-stabilises", seeds(**{**good, "attention_shrink": [0.1, 0.9, 0.5]})) == INCONCLUSIVE
    assert verdict("attention-stabilises", models(model("a"))) == INCONCLUSIVE  # one model: no interval
    assert verdict("attention-stabilises", models(model("a", attention_shrink=math.nan))) == NOT_MEASURABLE


def test_prop42_ratio_above_one_differs():
    """The bound is a sanity check (a theorem): it sits in CHECKS, not among the claims."""
    assert "prop-4.2-bound" in {c.id for c in CHECKS} and "prop-4.2-bound" not in {c.id for c in CLAIMS}
    assert verdict("prop-4.2-bound", models(model("a", prop42_max_ratio=1.0), model("b", prop42_max_ratio=0.3))) \
        == HOLDS
    assert verdict("prop-4.2-bound", models(model("a", prop42_max_ratio=1.01), model("b"))) == DIFFERS
    assert verdict("prop-4.2-bound", models(model("a", prop42_max_ratio=math.nan))) == NOT_MEASURABLE


def test_prop42_claim_is_the_empirical_relation_with_its_interval():
    row = dict(prop42_spearman=0.9, prop42_spearman_lo=0.85, prop42_spearman_hi=0.94)
    assert verdict("prop-4.2", models(model("a", **row))) == HOLDS
    assert verdict("prop-4.2", models(model("a", **row), model("b", prop42_spearman=0.1, prop42_spearman_lo=-0.1,
                                                                 prop42_spearman_hi=0.3))) == DIFFERS
    assert verdict("prop-4.2", models(model("a", prop42_spearman=0.55, prop42_spearman_lo=0.4,
                                            prop42_spearman_hi=0.7))) == INCONCLUSIVE
    assert verdict("prop-4.2", models(model("a"))) == NOT_MEASURABLE  # no relation measured


def test_stage_rules():
    assert verdict("stages-repeat", models(*trained("a", "stage_repeat_error", [0.3, 0.32, 0.31]))) == DIFFERS
    assert verdict("stages-repeat", models(*trained("a", "stage_repeat_error", [0.2, 0.21, 0.19]))) == HOLDS
    assert verdict("stages-repeat", models(model("a", stage_repeat_error=0.2))) == INCONCLUSIVE  # one model
    # a majority of base presets (variant "") must surely align; variants are not counted
    r = "colsum_pearson_median"
    m = models(*trained("l4", r, [0.6, 0.62, 0.61]), *trained("l8", r, [0.7, 0.68, 0.72]),
               *trained("l12", r, [0.1, 0.12, 0.08]), *trained("l4+inject", r, [-1.0, -0.9, -1.0]))
    assert verdict("stages-align", m) == HOLDS
    m = models(*trained("l4", r, [0.6, 0.62, 0.61]), *trained("l8", r, [0.1, 0.12, 0.08]))
    assert verdict("stages-align", m) == DIFFERS  # 1 of 2 is not a majority, and the other surely does not align
    m = models(*trained("l4", r, [0.6, 0.62, 0.61]), *trained("l8", r, [0.1, 0.9, 0.5]))
    assert verdict("stages-align", m) == INCONCLUSIVE  # l8's seeds disagree: no majority either way


def test_injection_final_pass_needs_both_halves():
    base = seeded("l4", [dict(colsum_pearson_last=0.5, colsum_pearson_early=0.5)] * 3)
    good = seeded("l4+inject", [dict(colsum_pearson_last=x, colsum_pearson_early=0.2) for x in (0.7, 0.75, 0.8)])
    assert verdict("inject-final-pass", models(*base, *good)) == HOLDS
    better_everywhere = seeded("l4+inject", [dict(colsum_pearson_last=0.7, colsum_pearson_early=x)
                                             for x in (0.7, 0.75, 0.8)])
    assert verdict("inject-final-pass", models(*base, *better_everywhere)) == DIFFERS
    worse_last = seeded("l4+inject", [dict(colsum_pearson_last=x, colsum_pearson_early=0.2) for x in (0.4, 0.42, 0.38)])
    assert verdict("inject-final-pass", models(*base, *worse_last)) == DIFFERS


def test_noprelude_and_best_fit():
    base = seeded("l4", [dict(colsum_pearson_median=x) for x in (0.7, 0.72, 0.68)])
    inj = seeded("l4+inject", [dict(colsum_pearson_median=0.5)] * 3)
    nop = seeded("l4+noprelude", [dict(colsum_pearson_median=x) for x in (0.6, 0.61, 0.62)])
    assert verdict("noprelude-worse", models(*base, *nop)) == HOLDS
    assert verdict("best-fit", models(*base, *inj, *nop)) == HOLDS
    nop_best = seeded("l4+noprelude", [dict(colsum_pearson_median=x) for x in (0.9, 0.85, 0.95)])
    assert verdict("noprelude-worse", models(*base, *nop_best)) == DIFFERS
    assert verdict("best-fit", models(*base, *inj, *nop_best)) == DIFFERS
    assert verdict("best-fit", models(*base[:1], *inj[:1], *nop[:1])) == INCONCLUSIVE  # one seed
    assert verdict("best-fit", models(*base)) == NOT_MEASURABLE


def test_sandwich_and_massive_activations_compare_matched_models():
    pre = seeded("l4", [dict(colsum_pearson_median=0.8, massive_ratio=x) for x in (500.0, 400.0, 600.0)])
    sandwich = seeded("l4+sandwich", [dict(norm="sandwich", colsum_pearson_median=x, massive_ratio=8.0)
                                      for x in (0.1, 0.2, 0.15)])
    assert verdict("sandwich-no-stages", models(*pre, *sandwich)) == HOLDS
    assert verdict("massive-activations", models(*pre, *sandwich)) == HOLDS
    swapped = seeded("l4+sandwich", [dict(norm="sandwich", colsum_pearson_median=x, massive_ratio=900.0)
                                     for x in (0.9, 0.95, 0.92)])
    assert verdict("sandwich-no-stages", models(*pre, *swapped)) == DIFFERS
    assert verdict("massive-activations", models(*pre, *swapped)) == DIFFERS
    # a sandwich model that differs in more than the norm (the builtin default: injection, width, recipe) is no
    # matched comparison: the rules do not read it
    unmatched = model("default", norm="sandwich", colsum_pearson_median=0.1)
    assert verdict("sandwich-no-stages", models(*pre, unmatched)) == NOT_MEASURABLE
    assert verdict("massive-activations", models(*pre)) == NOT_MEASURABLE


def test_cooccurrence_needs_orbits_and_sliders():
    assert verdict("cooccurrence", models(model("a", fraction_orbit=0.1))) == NOT_MEASURABLE
    both = dict(fraction_orbit=0.1, fraction_slider=0.1)
    assert verdict("cooccurrence", models(model("a", **both))) == HOLDS
    assert verdict("cooccurrence", models(model("a", **both, orbit_slider_cooccurrence=1))) == DIFFERS


def grid_verdicts(*rows: tuple[str, str, str, str]) -> dict[str, pd.DataFrame]:
    frame = pd.DataFrame([dict(norm=n, injection=i, paper=p, measured=m, cells="3/3",
                               agreement="holds" if p == m else "differs") for n, i, p, m in rows])
    return {"grid_verdicts": frame}


def test_grid_rules_split_by_injection():
    g = grid_verdicts(("pre", "concat", "stable", "stable"), ("sandwich", "concat", "stable", "stable"),
                      ("ouro", "concat", "not stable", "not stable"),
                      ("pre", "none", "stable, degenerate", "not stable"))
    assert verdict("grid-injection", g) == HOLDS
    assert verdict("grid-no-injection", g) == DIFFERS
    g = grid_verdicts(("ouro", "concat", "not stable", "stable"))
    assert verdict("grid-injection", g) == DIFFERS
    assert verdict("grid-no-injection", g) == NOT_MEASURABLE
    partly = pd.DataFrame([dict(norm="pre", injection="none", paper="stable, degenerate", cells="1/1",
                                measured="direction converges, norm still changing, degenerate", agreement="partly")])
    assert verdict("grid-no-injection", {"grid_verdicts": partly}) == DIFFERS  # only exact agreement holds


def test_grid_block_size():
    cells = pd.DataFrame([dict(norm="pre", injection="none", block_size=k, seed=s, verdict=v)
                          for k, v in ((4, "stable"), (12, "stable")) for s in (0, 1)])
    assert verdict("grid-block-size", {"grid_cells": cells}) == HOLDS
    cells.loc[cells.block_size == 12, "verdict"] = "not stable"
    assert verdict("grid-block-size", {"grid_cells": cells}) == DIFFERS
    assert verdict("grid-block-size", {"grid_cells": cells[cells.block_size == 4]}) == NOT_MEASURABLE


def per_r(model_name: str, trained: int, values: dict[int, dict]) -> list[dict]:
    base = dict(loss=3.0, accuracy=0.0, fixed_point_distance=0.0, successive_change=1e-5, fixed_point=1.0, orbit=0.0,
                slider=0.0, divergent=0.0, unknown=0.0, alignment_corr=0.8)
    return [dict(model=model_name, trained_recurrences=trained, recurrences=r, **{**base, **v})
            for r, v in values.items()]


def test_extrapolation_rules():
    stable = per_r("a", 4, {4: {}, 32: {"loss": 3.05}})
    drifting = per_r("b", 4, {4: {}, 32: {"fixed_point": 0.2, "successive_change": 0.1, "alignment_corr": 0.1}})
    m = {"extrapolate": pd.DataFrame(stable + drifting)}
    assert verdict("extrapolation-stable", m) == HOLDS
    assert verdict("extrapolation-unstable", m) == HOLDS
    assert verdict("extrapolation-performance", m) == HOLDS
    # a converging model whose alignment drifts, and whose loss rises, breaks both claims
    bad = per_r("a", 4, {4: {}, 32: {"alignment_corr": 0.5, "loss": 3.5}})
    m = {"extrapolate": pd.DataFrame(bad)}
    assert verdict("extrapolation-stable", m) == DIFFERS
    assert verdict("extrapolation-performance", m) == DIFFERS
    assert verdict("extrapolation-unstable", m) == NOT_MEASURABLE  # every model converges
    # a non-converging model that stays perfectly still contradicts "unstable"
    still = per_r("b", 4, {4: {}, 32: {"fixed_point": 0.2}})
    assert verdict("extrapolation-unstable", {"extrapolate": pd.DataFrame(still)}) == DIFFERS


def conditions(rates: dict[str, float], method: str = "paper") -> dict[str, pd.DataFrame]:
    rows = [dict(condition=c, method=method, reconstructed=False, n=1000, fixed_point=1 - r, orbit=r,
                 slider=0.0, divergent=0.0, unknown=0.0) for c, r in rates.items()]
    other = [dict(r, method="dynamics", fixed_point=0.0, orbit=1.0) for r in rows]  # must be ignored
    return {"conditions": pd.DataFrame(rows + other)}


def test_condition_rules_use_the_paper_classifier():
    m = conditions({"none": 0.0002, "long-persona": 0.0014, "long-persona-padded": 0.0005, "short-math": 0.0})
    assert verdict("rare-non-fixed", m) == HOLDS
    assert verdict("persona", m) == HOLDS
    m = conditions({"none": 0.02, "long-persona": 0.01, "long-persona-padded": 0.03})
    assert verdict("rare-non-fixed", m) == DIFFERS
    assert verdict("persona", m) == DIFFERS
    m = conditions({"none": 0.0002, "long-persona": 0.0014, "long-persona-padded": 0.002})  # length explains it
    assert verdict("persona", m) == DIFFERS
    m = conditions({"none": 0.002, "long-persona": 0.0014, "long-persona-padded": 0.0005})  # persona lowers it
    assert verdict("persona", m) == DIFFERS
    m = conditions({"none": 0.0, "long-persona": 0.0, "long-persona-padded": 0.0})
    assert verdict("persona", m) == NOT_MEASURABLE
    assert verdict("rare-non-fixed", conditions({"short-math": 0.0})) == NOT_MEASURABLE


def test_rare_non_fixed_reads_its_interval_over_questions():
    def with_interval(rate, lo, hi):
        m = conditions({"none": rate})
        m["conditions"]["non_fixed_low"], m["conditions"]["non_fixed_high"] = lo, hi
        return m

    assert verdict("rare-non-fixed", with_interval(0.004, 0.001, 0.008)) == HOLDS  # surely below 1 %
    assert verdict("rare-non-fixed", with_interval(0.02, 0.012, 0.03)) == DIFFERS  # surely above
    assert verdict("rare-non-fixed", with_interval(0.008, 0.002, 0.015)) == INCONCLUSIVE  # straddles 1 %


def test_the_non_fixed_interval_resamples_questions():
    """One question holds every non-fixed token: the interval over questions reaches 0 (resamples without it) and
    twice the rate (resamples it twice), which an interval over tokens would not."""
    from loopscope.experiments.conditions import behaviour_fractions

    labels = pd.DataFrame({"batch": [0] * 10 + [1] * 10, "token": list(range(10)) * 2, "method": "paper",
                           "behaviour": ["orbit"] * 4 + ["fixed_point"] * 16})
    row = behaviour_fractions(labels).iloc[0]
    assert row["n"] == 20 and row["orbit"] == pytest.approx(0.2)
    assert row["non_fixed_low"] == 0.0 and row["non_fixed_high"] == pytest.approx(0.4)


def test_thresholds_are_parameters():
    strict = Thresholds(settled=1e-6)
    rows = models(*trained("a", "max_final_relative_change", [2e-5, 3e-5, 2e-5]))
    assert verdict("settle", rows, strict) == DIFFERS
    assert verdict("settle", rows, TH) == HOLDS
    table = claims.thresholds_table(TH)
    assert dict(zip(table.threshold, table.value))["prop42_ratio"] == 1.0
    # every threshold has its reason, source and when it was fixed; the one fixed after seeing data says so
    assert set(claims.THRESHOLD_REASONS) == set(table.threshold) and table[["reason", "source", "fixed"]].all().all()
    assert table.set_index("threshold").loc["stages_kept", "fixed"].startswith("after seeing data")


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_claim_text_is_one_line(claim):
    assert "\n" not in claim.text and len(claim.text) < 200 and claim.source


def ablation(name: str, kind: str = "looped", **kw) -> dict:
    """An ablation row whose model has massive activations and loses its attention stages; override any column."""
    row = dict(model=name, kind=kind, segment="core", layer=1, massive_ratio_before=5000.0, massive_ratio_after=40.0,
               sink_rate_kept=0.2, colsum_concentration_kept=0.5, mean_kl=2.0)
    row.update(kw)
    return row


def test_massive_causal_judges_looped_models_with_massive_activations():
    m = lambda *rows: {"massive_ablation": pd.DataFrame(list(rows))}  # noqa: E731
    assert verdict("massive-causal", {}) == NOT_MEASURABLE
    assert verdict("massive-causal", m(ablation("l4"))) == HOLDS
    # one of the two stage metrics survives the ablation: the stages were not removed
    assert verdict("massive-causal", m(ablation("l4", colsum_concentration_kept=0.9))) == DIFFERS
    # the threshold is inclusive and read from Thresholds
    assert verdict("massive-causal", m(ablation("l4", colsum_concentration_kept=0.6))) == HOLDS
    assert verdict("massive-causal", m(ablation("l4", colsum_concentration_kept=0.6)),
                   Thresholds(stages_kept=0.59)) == DIFFERS
    # a looped model without sinks before the ablation: the ColSum ratio alone decides
    assert verdict("massive-causal", m(ablation("l4", sink_rate_kept=math.nan))) == HOLDS
    # no looped model with massive activations: a feedforward reference alone does not judge the looped claim
    below = ablation("l4", massive_ratio_before=30.0, sink_rate_kept=1.0, colsum_concentration_kept=1.0)
    v = next(c.rule for c in CLAIMS if c.id == "massive-causal")(
        m(below, ablation("smollm2", kind="feedforward-hf")), TH)
    assert v.verdict == NOT_MEASURABLE
    assert "l4 30 < 100" in v.evidence and "smollm2 (feedforward-hf)" in v.evidence and "stages removed" in v.evidence
    assert verdict("massive-causal", m(ablation("smollm2", kind="feedforward-hf"))) == NOT_MEASURABLE
