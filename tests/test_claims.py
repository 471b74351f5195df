"""Verdict rules of `experiments.claims` on hand-made tables: each rule's holds / differs / not-measurable cases,
with the threshold edges, so a rule that compares the wrong way or reads the wrong column fails here."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from loopscope.experiments import claims
from loopscope.experiments.claims import (
    CHECKS,
    CLAIMS,
    DIFFERS,
    HOLDS,
    INCONCLUSIVE,
    NOT_MEASURABLE,
    Thresholds,
    evaluate_claims,
)

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


def grid_cells(*groups: tuple[str, str, list[str]], block_sizes=(4, 12, 16), **setting) -> list[dict]:
    """Cells of (norm, injection, verdicts): verdicts[i] goes to the i-th (block size, seed) cell."""
    keys = [(k, seed) for seed in range(3) for k in block_sizes]
    return [dict(norm=n, injection=i, block_size=k, seed=seed, verdict=v, **setting)
            for n, i, verdicts in groups for (k, seed), v in zip(keys, verdicts)]


def test_grid_rules_judge_the_share_of_cells_per_norm():
    g = lambda *rows: {"grid_cells": pd.DataFrame(grid_cells(*rows))}  # noqa: E731
    m = g(("pre", "concat", ["stable"] * 9), ("sandwich", "concat", ["stable"] * 8 + ["not stable"]),
          ("ouro", "concat", ["not stable"] * 9), ("pre", "none", ["not stable"] * 9))
    assert verdict("grid-injection", m) == HOLDS  # 9/9, 8/9 (exact lower bound 0.52) and 9/9 agree
    assert verdict("grid-no-injection", m) == DIFFERS  # 0/9: upper bound 0.34 < 0.5
    # 7 of 9: the exact interval [0.40, 0.97] straddles a majority: not decided by a point estimate of 78 %
    m = g(("pre", "concat", ["stable"] * 7 + ["not stable"] * 2))
    assert verdict("grid-injection", m) == INCONCLUSIVE
    assert verdict("grid-no-injection", m) == NOT_MEASURABLE
    # only exact agreement counts: "direction converges" is not the paper's stable fixed point
    partly = g(("pre", "none", ["direction converges, norm still changing, degenerate"] * 9))
    assert verdict("grid-no-injection", partly) == DIFFERS
    # the default setting decides; another setting is reported beside it
    both = pd.DataFrame(grid_cells(("sandwich", "concat", ["not stable"] * 9), d_model=64, injected_rms=0.6325)
                        + grid_cells(("sandwich", "concat", ["stable"] * 9), d_model=64, injected_rms=1.0))
    v = next(c.rule for c in CLAIMS if c.id == "grid-injection")({"grid_cells": both}, TH)
    assert v.verdict == DIFFERS and "D=64, injected RMS 1: holds" in v.evidence


def test_grid_block_size_compares_each_block_with_twelve():
    same = pd.DataFrame(grid_cells(("pre", "none", ["stable"] * 9)))
    assert verdict("grid-block-size", {"grid_cells": same}) == HOLDS  # 6/6 cells at k = 4, 16 as k = 12
    flipped = same.assign(verdict=["stable" if k == 12 else "not stable" for k in same["block_size"]])
    assert verdict("grid-block-size", {"grid_cells": flipped}) == DIFFERS  # 0/6
    one_off = same.copy()
    one_off.loc[(one_off.block_size == 4) & (one_off.seed == 0), "verdict"] = "not stable"
    assert verdict("grid-block-size", {"grid_cells": one_off}) == INCONCLUSIVE  # 5/6: [0.36, 1.0]
    assert verdict("grid-block-size", {"grid_cells": same[same.block_size == 4]}) == NOT_MEASURABLE


def per_r(model_name: str, trained: int, values: dict[int, dict]) -> list[dict]:
    base = dict(loss=3.0, accuracy=0.0, fixed_point_distance=0.0, successive_change=1e-5, fixed_point=1.0, orbit=0.0,
                slider=0.0, divergent=0.0, unknown=0.0, alignment_corr=0.8)
    return [dict(model=model_name, trained_recurrences=trained, recurrences=r, **{**base, **v})
            for r, v in values.items()]


def units(model_name: str, recurrences: int, change: list[float] | None = None, loss: list[float] | None = None
          ) -> dict[str, list[dict]]:
    return {"extrapolate_per_prompt": [dict(model=model_name, recurrences=recurrences, prompt=i, successive_change=x)
                                       for i, x in enumerate(change or [])],
            "extrapolate_per_text": [dict(model=model_name, recurrences=recurrences, text=i, loss=x)
                                     for i, x in enumerate(loss or [])]}


def extrapolation(per_r_rows: list[dict], *unit_parts: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    m = {"extrapolate": pd.DataFrame(per_r_rows)}
    for name in ("extrapolate_per_prompt", "extrapolate_per_text"):
        m[name] = pd.DataFrame([row for part in unit_parts for row in part[name]])
    return m


def test_extrapolation_rules_judge_intervals_over_prompts_and_texts():
    texts = [3.0, 2.5, 3.5, 2.8, 3.2, 3.1, 2.9, 3.0]
    stable = per_r("a", 4, {4: {}, 32: {"loss": 3.05}})
    a_units = [units("a", 32, change=[1e-5, 2e-5, 1e-5, 3e-5]), units("a", 4, loss=texts),
               units("a", 32, loss=[x + 0.05 for x in texts])]
    drifting = per_r("b", 4, {4: {}, 32: {"fixed_point": 0.2, "successive_change": 0.1}})
    b_units = [units("b", 32, change=[0.08, 0.12, 0.1, 0.11])]
    m = extrapolation(stable + drifting, *a_units, *b_units)
    assert verdict("extrapolation-stable", m) == HOLDS
    assert verdict("extrapolation-unstable", m) == HOLDS
    v = next(c.rule for c in CLAIMS if c.id == "extrapolation-performance")(m, TH)
    # the paired rise is +0.05 on every text: a zero-width interval, well below 0.1 nats (an unpaired bootstrap of
    # the two losses would straddle 0.1 under this text-to-text spread)
    assert v.verdict == HOLDS and v.effect == pytest.approx(0.05) and v.ci_high == pytest.approx(0.05)
    # a rise of 0.2 nats on every text: surely above the 0.1 kept
    worse = [units("a", 32, change=[1e-5] * 4), units("a", 4, loss=texts),
             units("a", 32, loss=[x + 0.2 for x in texts])]
    assert verdict("extrapolation-performance", extrapolation(stable, *worse)) == DIFFERS
    # one prompt still moving 5 %: the interval over prompts reaches above 1 % → not surely stable
    one = [units("a", 32, change=[1e-5, 1e-5, 1e-5, 0.05])]
    assert verdict("extrapolation-stable", extrapolation(stable, *one)) == INCONCLUSIVE
    moving = [units("a", 32, change=[0.03, 0.05, 0.04, 0.06])]
    assert verdict("extrapolation-stable", extrapolation(stable, *moving)) == DIFFERS
    # a non-converging model that stays perfectly still contradicts "unstable"
    still = per_r("b", 4, {4: {}, 32: {"fixed_point": 0.2}})
    assert verdict("extrapolation-unstable", extrapolation(still, units("b", 32, change=[1e-5] * 4))) == DIFFERS
    assert verdict("extrapolation-unstable", extrapolation(stable, *a_units)) == NOT_MEASURABLE  # all converge
    # without the units there is no interval: inconclusive, never a verdict from the point alone
    assert verdict("extrapolation-stable", {"extrapolate": pd.DataFrame(stable)}) == INCONCLUSIVE


def conditions(counts: dict[str, list[int]], n: int = 100, method: str = "paper") -> dict[str, pd.DataFrame]:
    """Both conditions tables from non-fixed-point counts per question (every question has n tokens), for `method`;
    the other classifier's rows say every token orbits and must be ignored."""
    rows, by_q = [], []
    for c, ks in counts.items():
        by_q += [dict(condition=c, method=method, question=q, n=n, non_fixed=k) for q, k in enumerate(ks)]
        rate = sum(ks) / (n * len(ks))
        rows.append(dict(condition=c, method=method, reconstructed=False, n=n * len(ks), fixed_point=1 - rate,
                         orbit=rate, slider=0.0, divergent=0.0, unknown=0.0))
    other = [dict(r, method="dynamics", fixed_point=0.0, orbit=1.0) for r in rows]
    other_q = [dict(r, method="dynamics", non_fixed=r["n"]) for r in by_q]
    return {"conditions": pd.DataFrame(rows + other), "conditions_by_question": pd.DataFrame(by_q + other_q)}


def test_rare_non_fixed_is_judged_at_the_papers_rate_with_an_exact_interval():
    # 0 of 4,000 question tokens: the exact upper bound 0.092 % is below the paper's 0.14 %
    assert verdict("rare-non-fixed", conditions({"none": [0] * 40})) == HOLDS
    # 0 of 1,000: a bootstrap would say [0, 0] ("surely rare"); the exact bound 0.37 % straddles 0.14 %
    v = next(c.rule for c in CLAIMS if c.id == "rare-non-fixed")(conditions({"none": [0] * 10}), TH)
    assert v.verdict == INCONCLUSIVE and v.ci_high == pytest.approx(1 - 0.025 ** (1 / 1000))
    assert verdict("rare-non-fixed", conditions({"none": [3] * 10})) == DIFFERS  # 3 %: surely above
    # 0.5 % is "rare" under a 1 % rule but not at the paper's 0.14 %
    assert verdict("rare-non-fixed", conditions({"none": [1, 0] * 50})) == DIFFERS
    # the bootstrap over questions is wider than the exact interval when one question holds the tokens: it decides
    m = conditions({"none": [1] + [0] * 79})  # 1 of 8,000: exact upper 0.07 %
    assert verdict("rare-non-fixed", m) == HOLDS
    m["conditions"]["non_fixed_low"], m["conditions"]["non_fixed_high"] = 0.0, 0.003
    assert verdict("rare-non-fixed", m) == INCONCLUSIVE
    assert verdict("rare-non-fixed", conditions({"short-math": [0]})) == NOT_MEASURABLE


def test_persona_is_a_paired_difference_over_questions():
    base = [0, 10, 0, 20, 5, 0, 15, 2, 0, 30, 1, 8]  # questions differ a lot in their own rate …
    plus = [k + 1 for k in base]  # … and the persona adds one non-fixed token to every one of them
    m = conditions({"none": base, "long-persona": plus, "long-persona-padded": base})
    v = next(c.rule for c in CLAIMS if c.id == "persona")(m, TH)
    # paired: every question's difference is +1 %, so the interval is [1 %, 1 %]; an unpaired bootstrap of the two
    # rates would straddle 0 under this much question-to-question spread
    assert v.verdict == HOLDS and v.effect == pytest.approx(0.01) and v.ci_low == pytest.approx(0.01)
    assert verdict("persona", conditions({"none": plus, "long-persona": base, "long-persona-padded": base})) == DIFFERS
    # padding alone raises it as much: persona − padded is 0 → not above 0
    assert verdict("persona", conditions({"none": base, "long-persona": plus, "long-persona-padded": plus})) \
        == INCONCLUSIVE
    # one question carries the whole rise: the interval over questions reaches 0
    one = base.copy()
    one[3] += 12
    assert verdict("persona", conditions({"none": base, "long-persona": one, "long-persona-padded": base})) \
        == INCONCLUSIVE
    assert verdict("persona", conditions({"none": [0] * 5, "long-persona": [0] * 5,
                                          "long-persona-padded": [0] * 5})) == NOT_MEASURABLE
    assert verdict("persona", conditions({"none": base, "long-persona": plus})) == NOT_MEASURABLE


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
    assert (table["fixed"].str.startswith("a priori")).all()  # the one fixed after seeing data became effect only


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_claim_text_is_one_line(claim):
    assert "\n" not in claim.text and len(claim.text) < 200 and claim.source


def ablation(name: str, kind: str = "looped", **kw) -> dict:
    """An ablation row whose model has massive activations and loses its attention stages; override any column."""
    row = dict(model=name, kind=kind, segment="core", layer=1, massive_ratio_before=5000.0, massive_ratio_after=40.0,
               sink_rate_kept=0.2, colsum_concentration_kept=0.5, mean_kl=2.0)
    row.update(kw)
    return row


def test_massive_causal_reports_its_effect_without_a_verdict():
    """No threshold for 'removes the stages' was fixed before data were seen: effect only, the largest kept
    fraction of the two stage metrics over the judged models."""
    m = lambda *rows: {"massive_ablation": pd.DataFrame(list(rows))}  # noqa: E731
    rule = next(c.rule for c in CLAIMS if c.id == "massive-causal")
    assert verdict("massive-causal", {}) == NOT_MEASURABLE
    v = rule(m(ablation("l4"), ablation("l8", colsum_concentration_kept=0.9)), TH)
    assert v.verdict == claims.EFFECT_ONLY and v.effect == pytest.approx(0.9)  # the max, not the min or the mean
    # a looped model without sinks before the ablation: the ColSum ratio alone is its kept fraction
    assert rule(m(ablation("l4", sink_rate_kept=math.nan)), TH).effect == pytest.approx(0.5)
    # no looped model with massive activations: a feedforward reference alone does not judge the looped claim
    below = ablation("l4", massive_ratio_before=30.0, sink_rate_kept=1.0, colsum_concentration_kept=1.0)
    v = next(c.rule for c in CLAIMS if c.id == "massive-causal")(
        m(below, ablation("smollm2", kind="feedforward-hf")), TH)
    assert v.verdict == NOT_MEASURABLE
    assert "l4 30 < 100" in v.evidence and "smollm2 (feedforward-hf)" in v.evidence
    assert "ColSum concentration ×0.5" in v.evidence
    assert verdict("massive-causal", m(ablation("smollm2", kind="feedforward-hf"))) == NOT_MEASURABLE
