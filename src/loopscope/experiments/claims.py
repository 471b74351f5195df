"""The paper's claims, each judged against what `loopscope reproduce` measured: holds / differs / not measurable.

Blayney et al. (2026), as summarised in `shared/reference/looped-analysis-paper.md` (section numbers below are
that summary's). Every claim is one row of `CLAIMS`: an id, where the paper makes it, the claim in one line,
and a rule. A rule is a plain function of the measured tables; it returns a `Verdict` with the numbers it
used as evidence. Rules never look at anything but the tables, so each is unit-tested on hand-made tables
(`tests/test_claims.py`).

The measured tables (`Measurements`, a dict of DataFrames; any may be missing, which makes the claims that
need it "not measurable here"):

    models       one row per analysed looped model, written by `experiments.reproduce.model_summary`:
                 model (its name in the study), preset, base (preset before the first "+"), variant
                 ("" | "inject" | "noprelude" | …), norm, injection, n_prelude, block_size, trained_recurrences,
                 recurrences (of the dynamics capture), last_layer_relative_change, max_final_relative_change (both
                 means over tokens), last_layer_worst_token_change, worst_token_change (max over tokens: Prop. 4.1),
                 fraction_distinct, fraction_degenerate, fraction_no_fixed_point, min_cosine_to_first,
                 fraction_fixed_point, fraction_orbit, fraction_slider, orbit_slider_cooccurrence,
                 attention_self_match, attention_shrink, prop42_max_ratio, stage_repeat_error,
                 colsum_pearson_median, colsum_pearson_last, colsum_pearson_early, massive_ratio
    grid_cells   `experiments.grid.run_grid` cells (norm, injection, block_size, seed, verdict, d_model,
                 injected_rms, …): the grid rows judge the share of cells per norm; grid_verdicts
                 (`experiments.grid.verdict_table`) is drawn, not judged
    extrapolate  `run_extrapolate(...)["per_r"]`: model, trained_recurrences, recurrences, loss, accuracy,
                 fixed_point_distance, successive_change, fixed_point, …, alignment_corr; its units
                 extrapolate_per_text (model, recurrences, text, loss) and extrapolate_per_prompt (model,
                 recurrences, prompt, successive_change)
    conditions   `run_conditions(...)`: condition, method, n, fixed_point, orbit, slider, divergent, unknown,
                 non_fixed_low, non_fixed_high; conditions_by_question: its attrs["by_question"] (condition,
                 method, question, n, non_fixed: the units of the paired bootstrap between conditions)
    massive_ablation  one row per ablated model, `experiments.intervene.massive_ablation_tables`: model, kind
                 ("looped" | "feedforward-hf"), segment, layer (the MLP zeroed), massive_ratio_before/after,
                 sink_rate_kept, colsum_concentration_kept (mean after / mean before), mean_kl, …

Thresholds live in `Thresholds` (one documented field each); they were fixed before looking at results and
`reproduce` writes them into the report beside the verdicts (`THRESHOLD_REASONS`: reason, source, when fixed). The
ablation rows (`massive-causal`) have none: the only candidate was chosen after SmolLM2's ablation had been seen
(sink rate ×0.27, ColSum ×0.52), so they report the effect and the verdict `effect only`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd

from loopscope.dynamics.degeneracy import SAME_POINT_COSINE

HOLDS, DIFFERS, NOT_MEASURABLE, INCONCLUSIVE = "holds", "differs", "not measurable here", "inconclusive"
EFFECT_ONLY = "effect only"  # no threshold could be fixed before seeing data: the effect is reported, no verdict
VERDICTS = (HOLDS, DIFFERS, NOT_MEASURABLE, INCONCLUSIVE, EFFECT_ONLY)  # inconclusive: the interval straddles it
# effect, ci_low, ci_high: the number a verdict rests on and its 95 % interval (NaN where a rule has none);
# figure: where in the report the reader sees it
CLAIM_COLUMNS = ["id", "source", "claim", "verdict", "effect", "ci_low", "ci_high", "evidence", "measured_on",
                 "figure"]

Measurements = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Thresholds:
    settled: float = 1e-2  # "barely change": largest per-layer relative change ‖X_t − X_{t−1}‖/‖X_{t−1}‖ at the last
    # recurrence; 1 % of the state's norm
    fixed_point: float = 1e-3  # a layer is at its fixed point below this relative change (= dynamics.degeneracy's
    # converge_tol, so the per-token verdicts and these rules agree)
    majority: float = 0.5  # "reaches a distinct cyclic fixed point" = more than this fraction of tokens do
    degenerate_cosine: float = SAME_POINT_COSINE  # layers' fixed points are one point when min cos(X*_0, X*_j) ≥
    # this (dynamics.degeneracy's tol, the one place the 0.99 is written)
    prop41_factor: float = 10.0  # Prop. 4.1: once the last layer changes < fixed_point, every layer changes
    # < prop41_factor · fixed_point (a Lipschitz block spreads the residual change by a bounded factor)
    diagonal_band: float = 0.9  # attention "diagonal bands": at least this fraction of (layer, recurrence)
    # patterns have their nearest pattern from another recurrence in the same layer
    attention_shrink: float = 0.5  # and ‖A_{j,R−2} − A_{j,R−1}‖ is at most this fraction of ‖A_{j,0} − A_{j,R−1}‖
    prop42_ratio: float = 1.0  # measured attention change / Prop. 4.2 bound; above 1 the bound is violated
    tracks: float = 0.5  # "attention change tracks state change": Spearman ρ(‖ΔS‖, ‖ΔX‖) above this (a monotone
    # relation that orders most check pairs alike; fixed before any run, the paper gives no number)
    aligned: float = 0.5  # a pass "follows the feedforward stages" when its ColSum profile's Pearson r with the
    # control's is at least this (median over passes for a model)
    repeat_error: float = 0.25  # a stage profile "repeats every pass" when the RMS difference of each block
    # layer's ColSum between pass t ≥ 1 and the last pass is at most this fraction of ColSum's spread over depth
    extrapolation_change: float = 1e-2  # stable under extrapolation: last layer's relative change at the
    # largest R surely below this (= settled); the stage alignment is shown beside it, not judged (one profile per R)
    loss_drift: float = 0.1  # held-out loss at R_max at most this many nats above the loss at R_train
    loop_gain: float = 0.05  # a healed retrofit "uses its loop" when its loss at the training R is surely this many
    # nats below its own loss at R = 1 (the target issue 11 set before healing)
    massive: float = 100.0  # a model "has massive activations" when its largest peak/median |x| reaches this
    # (= stages.massive.MASSIVE_RATIO; Sun et al. 2024 report 10^3–10^4)
    rare: float = 0.0014  # "rare": non-fixed-point tokens below 0.14 %, the largest rate the paper reports (long
    # persona) and still calls rare; its no-system-prompt rate is 0.02 % (App. C.1)
    condition_method: str = "paper"  # which classifier's rates the App. C claims use (the paper's heuristic)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    evidence: str
    measured_on: str = ""
    effect: float = math.nan  # the effect the verdict rests on (its sign convention: > 0 is the paper's direction)
    ci_low: float = math.nan  # its 95 % interval (over seeds or prompts; NaN: none)
    ci_high: float = math.nan


@dataclass(frozen=True)
class Claim:
    id: str
    source: str  # where the paper makes it (sections of the reference summary; figures)
    text: str  # the claim in one line
    rule: Callable[[Measurements, Thresholds], Verdict]
    figure: str = ""  # where the report shows what the row measured


# ---------------------------------------------------------------------------------------------- helpers

def fmt(x: float) -> str:
    """Short number for evidence strings: 3 significant digits, scientific below 1e-3."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.3g}"


def fixed_share(row: pd.Series) -> float:
    """The share of tokens at a fixed point as far as the detector can tell: fixed_point plus at_floor (motion
    below the state's rounding floor; tables from before that label have no such column)."""
    at_floor = row.get("at_floor", 0.0)
    return float(row["fixed_point"]) + (0.0 if pd.isna(at_floor) else float(at_floor))


def missing(m: Measurements, *names: str) -> Verdict | None:
    gone = [n for n in names if n not in m or m[n] is None or len(m[n]) == 0]
    if gone:
        return Verdict(NOT_MEASURABLE, f"no {', '.join(gone)} table: that stage was not run")
    return None


def each_model(rows: pd.DataFrame, column: str, ok: Callable[[float], bool]) -> tuple[str, str]:
    """(verdict, evidence) for "every model satisfies ok(column)": holds when all do; NaN rows are skipped
    (not measurable if every row is NaN)."""
    values = rows[["model", column]].dropna()
    if values.empty:
        return NOT_MEASURABLE, f"{column} is NaN for every model"
    passed = [ok(v) for v in values[column]]
    evidence = "; ".join(f"{m} {fmt(v)}" for m, v in zip(values["model"], values[column]))
    verdict = HOLDS if all(passed) else DIFFERS
    return verdict, f"{sum(passed)}/{len(passed)} models: {evidence}"


def preset_verdicts(rows: pd.DataFrame, column: str, margin: Callable[[float], float], what: str
                    ) -> tuple[list[tuple[str, str, tuple[float, float, float]]], str]:
    """Per preset trained here: (preset, verdict, (mean, lo, hi)) of `margin(x)` (> 0 = the threshold is met) over
    its seeds (`interval_verdict`: one seed is inconclusive), and the evidence string. Models not trained here (no
    seed: a builtin) are listed but not judged; a table without seeds is judged model by model, each one sample.
    NaN values are skipped."""
    values = rows.dropna(subset=[column])
    seeded = values["seed"].notna() if "seed" in values else pd.Series(False, index=values.index)
    judged = values[seeded] if seeded.any() else values
    key = "preset" if seeded.any() and "preset" in judged else "model"
    out, parts = [], []
    for name, group in judged.groupby(key, sort=False):
        verdict, ev, stats = interval_verdict(f"margin {name}", [margin(x) for x in group[column]])
        out.append((str(name), verdict, stats))
        parts.append(f"{ev}; {what} " + ", ".join(fmt(x) for x in group[column]))
    unjudged = values[~seeded] if seeded.any() else values.iloc[0:0]
    extra = "; not judged (one model, no seeds): " + ", ".join(
        f"{r.model} {fmt(getattr(r, column))}" for r in unjudged.itertuples()) if len(unjudged) else ""
    return out, " | ".join(parts) + extra


def worst_stats(judged: list[tuple[str, str, tuple[float, float, float]]]) -> tuple[float, float, float]:
    """The row's effect: the preset with the lowest lower bound (NaN lower bounds — one sample — first)."""
    return min((stats for _, _, stats in judged), key=lambda st: (not math.isnan(st[1]), st[1]))


def each_preset(rows: pd.DataFrame, column: str, margin: Callable[[float], float], what: str
                ) -> tuple[str, str, tuple[float, float, float]]:
    """(verdict, evidence, worst preset's (mean, lo, hi)) for "every model satisfies the threshold"
    (`preset_verdicts`): holds when every preset holds, differs when one differs, else inconclusive; not measurable
    when every value is NaN."""
    judged, ev = preset_verdicts(rows, column, margin, what)
    if not judged:
        return NOT_MEASURABLE, f"{column} is NaN for every model", (math.nan, math.nan, math.nan)
    return combine_verdicts([v for _, v, _ in judged]), ev, worst_stats(judged)


def names(rows: pd.DataFrame) -> str:
    return ", ".join(rows["model"])


def same_seed(rows: pd.DataFrame, seed) -> pd.Series:
    """Rows trained with `seed` (a table without a seed column, or a NaN seed, matches itself only)."""
    if "seed" not in rows or pd.isna(seed):
        return rows.get("seed", pd.Series(math.nan, index=rows.index)).isna()
    return rows["seed"] == seed


def pair(m: Measurements, variant: str) -> list[tuple[pd.Series, pd.Series]]:
    """(base model row, variant row) for every base trained with exactly `variant` as well, seed by seed: the
    variant of seed s is compared with the base of seed s (same data order and initialisation seed)."""
    models = m["models"]
    out = []
    for _, v in models[models["variant"] == variant].iterrows():
        base = models[(models["base"] == v["base"]) & (models["variant"] == "") & same_seed(models, v.get("seed"))]
        if len(base):
            out.append((base.iloc[0], v))
    return out


def side(lo: float, hi: float, threshold: float, above_holds: bool = True) -> str:
    """holds / differs when the interval [lo, hi] lies wholly above (or below) `threshold`, else inconclusive."""
    if any(math.isnan(x) for x in (lo, hi)):
        return NOT_MEASURABLE
    if lo > threshold:
        return HOLDS if above_holds else DIFFERS
    if hi < threshold:
        return DIFFERS if above_holds else HOLDS
    return INCONCLUSIVE


def interval_side(stats: tuple[float, float, float], threshold: float, above_holds: bool) -> str:
    """`side` of an effect's interval; inconclusive when it has none (a table without its units, fewer than two
    seeds)."""
    _, lo, hi = stats
    return INCONCLUSIVE if math.isnan(lo) or math.isnan(hi) else side(lo, hi, threshold, above_holds)


def interval_verdict(name: str, values: list[float]) -> tuple[str, str, tuple[float, float, float]]:
    """(verdict, evidence, (mean, lo, hi)) for one effect measured once per seed, > 0 being the paper's direction:
    holds when the 95 % interval over seeds is above 0, differs when below, inconclusive when it straddles 0 or
    when there is a single seed (no interval: one sample cannot say how large the seed-to-seed spread is)."""
    from loopscope.evidence import seed_interval

    mean, lo, hi = seed_interval(values)
    per_seed = ", ".join(fmt(v) for v in values)
    if len(values) < 2:
        return INCONCLUSIVE, f"{name} {fmt(mean)} (one seed: no interval)", (mean, lo, hi)
    verdict = interval_side((mean, lo, hi), 0.0, above_holds=True)  # NaN bounds: fewer than two finite values
    return verdict, (f"{name} {fmt(mean)} [{fmt(lo)}, {fmt(hi)}] over {len(values)} seeds "
                     f"(per seed {per_seed})"), (mean, lo, hi)


def combine_verdicts(verdicts: list[str]) -> str:
    """Several effects that must all point the paper's way: holds when all hold, differs when one differs."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return DIFFERS if DIFFERS in verdicts else INCONCLUSIVE


# ---------------------------------------------------------------------------------------------- rules

def rule_settle(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    verdict, ev, stats = each_preset(m["models"], "max_final_relative_change",
                                     lambda x: log10_ratio(th.settled, x), "change")
    return Verdict(verdict, f"largest per-layer relative change at the last recurrence ≤ {fmt(th.settled)}; margin = "
                   f"log10({fmt(th.settled)} / change), 95 % interval over seeds: {ev}", names(m["models"]), *stats)


def rule_injection_cyclic(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    rows = m["models"][m["models"]["injection"] != "none"]
    if rows.empty:
        return Verdict(NOT_MEASURABLE, "no model with input injection was analysed")
    verdict, ev, stats = each_preset(rows, "fraction_distinct", lambda x: x - th.majority, "fraction")
    return Verdict(verdict, f"fraction of tokens at a distinct cyclic fixed point > {fmt(th.majority)}; margin = "
                   f"fraction − {fmt(th.majority)}, 95 % interval over seeds: {ev}", names(rows), *stats)


def judge_pairs(m: Measurements, variant: str, what: str, effects: dict[str, Callable[[pd.Series, pd.Series], float]]
                ) -> Verdict:
    """A claim about a variant against its own base, trained with the same seeds: every effect (> 0 = the paper's
    direction) is measured once per seed pair (`pair`) and judged by its interval over seeds (`interval_verdict`);
    not measurable without a pair or when an effect is NaN."""
    if (v := missing(m, "models")) is not None:
        return v
    pairs = pair(m, variant)
    if not pairs:
        return Verdict(NOT_MEASURABLE, f"no model trained both with and without {what} (same base, same seed)")
    verdicts, parts, first = [], [], None
    for name, effect in effects.items():
        values = [float(effect(base, var)) for base, var in pairs]
        if any(math.isnan(x) for x in values):
            return Verdict(NOT_MEASURABLE, f"{name} is NaN for a pair ({', '.join(b['model'] for b, _ in pairs)})")
        verdict, ev, stats = interval_verdict(name, values)
        verdicts.append(verdict)
        parts.append(ev)
        first = first or stats
    return Verdict(combine_verdicts(verdicts), "; ".join(parts),
                   ", ".join(f"{b['model']} vs {v['model']}" for b, v in pairs), *first)


def log10_ratio(a: float, b: float, floor: float = 1e-12) -> float:
    """log10(a / b), both floored at `floor` (a change of exactly 0 is the rounding floor, not −∞)."""
    return math.log10(max(float(a), floor)) - math.log10(max(float(b), floor))


def rule_injection_helps(m: Measurements, th: Thresholds) -> Verdict:
    """Effect: log10(base's last-layer relative change / the injected variant's), per seed: how many orders of
    magnitude closer to its fixed point injection brings the same model."""
    return judge_pairs(m, "inject", "injection", {
        "log10(change without / with injection)":
            lambda base, inj: log10_ratio(base["last_layer_relative_change"], inj["last_layer_relative_change"]),
    })


def rule_distinct_not_degenerate(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    verdict, ev, stats = each_preset(m["models"], "min_cosine_to_first", lambda x: th.degenerate_cosine - x, "cos")
    return Verdict(verdict, f"min cos between layer 0's and another layer's fixed point < "
                            f"{fmt(th.degenerate_cosine)}; margin = {fmt(th.degenerate_cosine)} − cos, 95 % interval "
                            f"over seeds: {ev}", names(m["models"]), *stats)


def rule_prop41(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    if "worst_token_change" not in m["models"]:
        return Verdict(NOT_MEASURABLE, "the per-token worst relative changes were not measured")
    rows = m["models"][m["models"]["last_layer_worst_token_change"] < th.fixed_point]
    if rows.empty:
        return Verdict(NOT_MEASURABLE, f"no model's last block layer converged for every token (relative change < "
                                       f"{fmt(th.fixed_point)}), so the premise never holds")
    bound = th.prop41_factor * th.fixed_point
    verdict, ev = each_model(rows, "worst_token_change", lambda x: x < bound)
    return Verdict(verdict, f"last layer converged for every token; every layer's worst token's relative change < "
                   f"{fmt(bound)}: {ev}", names(rows))


def rule_attention_stabilises(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    rows = m["models"].dropna(subset=["attention_self_match", "attention_shrink"])
    if rows.empty:
        return Verdict(NOT_MEASURABLE, "no attention captured over ≥ 3 recurrences")
    bands, ev_bands, st_bands = each_preset(rows, "attention_self_match", lambda x: x - th.diagonal_band,
                                            "self-match")
    shrink, ev_shrink, _ = each_preset(rows, "attention_shrink", lambda x: th.attention_shrink - x, "shrink")
    return Verdict(combine_verdicts([bands, shrink]),
                   f"diagonal bands (self-match ≥ {fmt(th.diagonal_band)}; margin self-match − "
                   f"{fmt(th.diagonal_band)}): {ev_bands} || attention change shrinking (late/early ≤ "
                   f"{fmt(th.attention_shrink)}; margin {fmt(th.attention_shrink)} − shrink): {ev_shrink}",
                   names(rows), *st_bands)


def rule_prop42(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    rows = m["models"].dropna(subset=["prop42_max_ratio"])
    if rows.empty:
        return Verdict(NOT_MEASURABLE, "the Prop. 4.2 check did not run (needs ≥ 2 recurrences with attention)")
    worst = float(rows["prop42_max_ratio"].max())
    ev = "; ".join(f"{r.model} {fmt(r.prop42_max_ratio)}" for r in rows.itertuples())
    return Verdict(HOLDS if worst <= th.prop42_ratio else DIFFERS,
                   f"largest measured/bound ratio {fmt(worst)} (≤ {fmt(th.prop42_ratio)} required): {ev}", names(rows))


def rule_attention_tracks_state(m: Measurements, th: Thresholds) -> Verdict:
    """The empirical content of Prop. 4.2: per model, Spearman ρ(‖ΔS‖, ‖ΔX‖) with its bootstrap interval over
    prompts; holds when every model's interval is above `tracks`, differs when one is below, else inconclusive."""
    if (v := missing(m, "models")) is not None:
        return v
    if "prop42_spearman" not in m["models"]:
        return Verdict(NOT_MEASURABLE, "the attention/state change relation was not measured")
    rows = m["models"].dropna(subset=["prop42_spearman"])
    if rows.empty:
        return Verdict(NOT_MEASURABLE, "no model had ≥ 2 recurrences with attention")
    above = rows["prop42_spearman_lo"] > th.tracks
    below = rows["prop42_spearman_hi"] < th.tracks
    verdict = HOLDS if above.all() else DIFFERS if below.any() else INCONCLUSIVE
    ev = "; ".join(f"{r.model} ρ_s {fmt(r.prop42_spearman)} [{fmt(r.prop42_spearman_lo)}, "
                   f"{fmt(r.prop42_spearman_hi)}]" for r in rows.itertuples())
    worst = rows.loc[rows["prop42_spearman"].idxmin()]  # the row's effect: the weakest model's ρ and interval
    return Verdict(verdict, f"Spearman ρ(‖ΔS‖, ‖ΔX‖) over (recurrence, layer, prompt, head), 95 % bootstrap over "
                   f"prompts; holds when every interval is above {fmt(th.tracks)}: {ev}", names(rows),
                   float(worst["prop42_spearman"]), float(worst["prop42_spearman_lo"]),
                   float(worst["prop42_spearman_hi"]))


def rule_stages_align(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    rows = m["models"][(m["models"]["variant"] == "")].dropna(subset=["colsum_pearson_median"])
    if rows.empty:
        return Verdict(NOT_MEASURABLE, "no base looped model aligned with a feedforward control")
    judged, ev = preset_verdicts(rows, "colsum_pearson_median", lambda r: r - th.aligned, "r")
    n_holds, n_differs = sum(v == HOLDS for _, v, _ in judged), sum(v == DIFFERS for _, v, _ in judged)
    # "self-organise into feedforward-like stages": a majority of base presets surely aligned
    verdict = HOLDS if n_holds > len(judged) / 2 else DIFFERS if n_differs >= len(judged) / 2 else INCONCLUSIVE
    return Verdict(verdict, f"{n_holds}/{len(judged)} base presets surely aligned (median ColSum Pearson r ≥ "
                   f"{fmt(th.aligned)} against the control, 95 % interval over seeds of r − {fmt(th.aligned)}; a "
                   f"majority needed), {n_differs} surely not: {ev}", names(rows), *worst_stats(judged))


def rule_stages_repeat(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    verdict, ev, stats = each_preset(m["models"], "stage_repeat_error", lambda x: th.repeat_error - x, "error")
    return Verdict(verdict, f"ColSum per block layer, pass t ≥ 1 vs last pass, RMS / spread over depth ≤ "
                            f"{fmt(th.repeat_error)}; margin = {fmt(th.repeat_error)} − error, 95 % interval over "
                            f"seeds: {ev}", names(m["models"]), *stats)


def rule_injection_final_pass(m: Measurements, th: Thresholds) -> Verdict:
    """Two effects per seed, both > 0 for the claim: the last pass's ColSum Pearson r rises with injection, and the
    earlier passes' mean r falls (the expense)."""
    last, early = "colsum_pearson_last", "colsum_pearson_early"
    return judge_pairs(m, "inject", "injection", {
        "last-pass r gain": lambda base, inj: inj[last] - base[last],
        "earlier-pass r loss": lambda base, inj: base[early] - inj[early],
    })


def rule_noprelude_worse(m: Measurements, th: Thresholds) -> Verdict:
    """Effect: the base's median ColSum r minus the prelude-less variant's, per seed."""
    median = "colsum_pearson_median"
    return judge_pairs(m, "noprelude", "prelude/coda", {"median r lost without prelude/coda":
                                                         lambda base, nop: base[median] - nop[median]})


def rule_best_fit(m: Measurements, th: Thresholds) -> Verdict:
    """Effect per (base, seed): the plain model's median ColSum r minus the best of its +inject / +noprelude
    variants' (> 0: the plain model fits best), judged over seeds."""
    if (v := missing(m, "models")) is not None:
        return v
    models = m["models"].dropna(subset=["colsum_pearson_median"])
    models = models[models["variant"].isin(["", "inject", "noprelude"])]
    keys = ["base", "seed"] if "seed" in models else ["base"]
    values, where = [], []
    for key, group in models.groupby(keys, sort=False, dropna=False):
        plain, others = group[group["variant"] == ""], group[group["variant"] != ""]
        if plain.empty or others.empty:
            continue
        values.append(float(plain["colsum_pearson_median"].iloc[0] - others["colsum_pearson_median"].max()))
        where.append(", ".join(group["model"]))
    if not values:
        return Verdict(NOT_MEASURABLE, "no base model aligned beside its +inject / +noprelude variants")
    verdict, ev, stats = interval_verdict("plain model's median r minus its best variant's", values)
    return Verdict(verdict, ev, "; ".join(where), *stats)


def rule_sandwich_no_stages(m: Measurements, th: Thresholds) -> Verdict:
    """Matched: each pre-norm base against the same base trained with a sandwich norm (`+sandwich`: same size,
    data, steps and seed). Effect: pre-norm median ColSum r minus sandwich's, per seed."""
    median = "colsum_pearson_median"
    return judge_pairs(m, "sandwich", "a sandwich norm", {"median r lost with a sandwich norm":
                                                          lambda pre, sw: pre[median] - sw[median]})


def rule_massive(m: Measurements, th: Thresholds) -> Verdict:
    """Matched as `rule_sandwich_no_stages`. Effect: log10(pre-norm's largest peak/median |x| / sandwich's)."""
    return judge_pairs(m, "sandwich", "a sandwich norm", {"log10(massive ratio pre-norm / sandwich)":
                                                          lambda pre, sw: log10_ratio(pre["massive_ratio"],
                                                                                      sw["massive_ratio"])})


def rule_cooccurrence(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "models")) is not None:
        return v
    models = m["models"]
    orbits = (models["fraction_orbit"] > 0).any()
    sliders = (models["fraction_slider"] > 0).any()
    if not (orbits and sliders):
        return Verdict(NOT_MEASURABLE, f"no orbit and slider tokens to co-occur (orbit tokens in any model: "
                                       f"{bool(orbits)}, slider tokens: {bool(sliders)})")
    total = int(models["orbit_slider_cooccurrence"].sum())
    return Verdict(HOLDS if total == 0 else DIFFERS, f"tokens that orbit at one block layer and slide at another: "
                   f"{total} (a count, no interval: 'never' is contradicted by one token)", names(models),
                   effect=float(total))


def grid_setting_label(d_model, injected_rms) -> str:
    return f"D={int(d_model)}, injected RMS {float(injected_rms):g}"


def grid_cells_by_setting(m: Measurements) -> pd.DataFrame:
    """The grid's cells with their setting columns (a grid run before width and RMS were axes ran the default)
    and `default` marking the setting fixed before any run (`experiments.grid.DEFAULT_SETTING`)."""
    from loopscope.experiments.grid import DEFAULT_SETTING, is_default

    cells = m["grid_cells"]
    if "d_model" not in cells:
        cells = cells.assign(d_model=DEFAULT_SETTING["d_model"], injected_rms=DEFAULT_SETTING["injected_rms"])
    return cells.assign(default=[is_default(d, r) for d, r in zip(cells["d_model"], cells["injected_rms"])])


def share_verdict(k: int, n: int, th: Thresholds) -> tuple[str, tuple[float, float, float]]:
    """holds when surely more than `majority` of n independent cells agree (the exact binomial interval of k / n
    above it), differs when surely fewer, else inconclusive; and (k/n, lo, hi)."""
    from loopscope.evidence import clopper_pearson

    lo, hi = clopper_pearson(k, n)
    return side(lo, hi, th.majority), (k / n, lo, hi)


Judged = tuple[str, str, tuple[float, float, float]]  # (verdict, evidence, the worst group's (effect, lo, hi))
NO_DEFAULT = "the grid did not run the default setting (D=64, injected RMS 0.6325)"


def judge_settings(cells: pd.DataFrame, judge: Callable[[pd.DataFrame], Judged]
                   ) -> tuple[Judged, list[tuple[str, str, str]]] | None:
    """`judge` at the default setting, and (label, verdict, evidence) at every other setting; None when the grid
    did not run the default."""
    default = cells[cells["default"]]
    if default.empty:
        return None
    others = []
    for key, part in cells[~cells["default"]].groupby(["d_model", "injected_rms"], sort=False):
        verdict, evidence, _ = judge(part)
        others.append((grid_setting_label(*key), verdict, evidence))
    return judge(default), others


def rule_grid(injection_on: bool) -> Callable[[Measurements, Thresholds], Verdict]:
    """Per norm, the share of its random-init cells (block sizes × seeds, each an independent initialisation) whose
    verdict is the paper's, with its exact binomial interval (`share_verdict`): the norm holds when surely most cells
    agree. The row's verdict is the default setting's (fixed before any run: `experiments.grid.DEFAULT_SETTING`); the
    evidence then gives the same per other (width, injected RMS) setting — the paper publishes neither, so a verdict
    that flips with them is a finding about the setting, not the paper."""
    def rule(m: Measurements, th: Thresholds) -> Verdict:
        from loopscope.experiments.grid import PAPER_VERDICTS

        if (v := missing(m, "grid_cells")) is not None:
            return v
        cells = grid_cells_by_setting(m)
        cells = cells[(cells["injection"] != "none") == injection_on]
        if cells.empty:
            return Verdict(NOT_MEASURABLE, f"the grid had no cells {'with' if injection_on else 'without'} injection")

        def judge(part: pd.DataFrame) -> Judged:
            verdicts, stats, parts = [], [], []
            for (norm, injection), group in part.groupby(["norm", "injection"], sort=False):
                paper = PAPER_VERDICTS.get((norm, injection), "—")
                k = int((group["verdict"] == paper).sum())
                v, st = share_verdict(k, len(group), th)
                verdicts.append(v)
                stats.append(st)
                measured = group["verdict"].value_counts()
                parts.append(f"{norm}: {k}/{len(group)} cells as the paper's '{paper}' [{fmt(st[1])}, {fmt(st[2])}] "
                             f"({v}; most often {measured.index[0]})")
            return combine_verdicts(verdicts), "; ".join(parts), min(stats, key=lambda st: st[1])

        judged = judge_settings(cells, judge)
        if judged is None:
            return Verdict(NOT_MEASURABLE, NO_DEFAULT)
        (verdict, ev, worst), others = judged
        where = (" Other settings — " + " | ".join(f"{label}: {v} — {e}" for label, v, e in others) + ".") \
            if others else ""
        return Verdict(verdict, f"default setting (share of cells with the paper's verdict, 95 % exact interval, "
                       f"holds above {fmt(th.majority)}): {ev}.{where}",
                       "random-init grid, " + ("with" if injection_on else "without") + " injection", *worst)
    return rule


def rule_grid_block_size(m: Measurements, th: Thresholds) -> Verdict:
    """Per norm × injection at the default setting: the share of its cells at the other block sizes whose verdict is
    the 12-layer block's most common one (`share_verdict`; the reference is the middle block size when 12 was not
    run); holds when every group surely agrees, differs when one surely does not. Other settings in the evidence."""
    if (v := missing(m, "grid_cells")) is not None:
        return v
    cells = grid_cells_by_setting(m)
    blocks = sorted(cells["block_size"].unique())
    if len(blocks) < 2:
        return Verdict(NOT_MEASURABLE, f"one block size only ({blocks[0]})")
    ref = 12 if 12 in blocks else blocks[len(blocks) // 2]

    def judge(part: pd.DataFrame) -> Judged:
        verdicts, stats, parts = [], [], []
        for (norm, injection), group in part.groupby(["norm", "injection"], sort=False):
            at_ref = group[group["block_size"] == ref]["verdict"]
            rest = group[group["block_size"] != ref]
            if at_ref.empty or rest.empty:
                continue
            expected = at_ref.value_counts().index[0]
            k = int((rest["verdict"] == expected).sum())
            v, st = share_verdict(k, len(rest), th)
            verdicts.append(v)
            stats.append(st)
            parts.append(f"{norm}/{injection}: {k}/{len(rest)} as k={ref}'s '{expected}' ({v})")
        if not verdicts:
            return NOT_MEASURABLE, f"no norm × injection ran k={ref} and another block size", (math.nan,) * 3
        return combine_verdicts(verdicts), "; ".join(parts), min(stats, key=lambda st: st[1])

    judged = judge_settings(cells, judge)
    if judged is None:
        return Verdict(NOT_MEASURABLE, NO_DEFAULT)
    (verdict, ev, worst), others = judged
    where = (" Other settings — " + "; ".join(f"{label}: {v}" for label, v, _ in others) + ".") if others else ""
    return Verdict(verdict, f"share of cells at block sizes ≠ {ref} with the k={ref} verdict (95 % exact interval, "
                   f"holds above {fmt(th.majority)}), default setting: {ev}.{where}",
                   "block sizes " + ", ".join(map(str, blocks)), *worst)


def extrapolation_rows(m: Measurements, th: Thresholds) -> pd.DataFrame:
    """One row per model: values at the training R and at the largest R, and whether it converges there."""
    rows = []
    for model, part in m["extrapolate"].groupby("model", sort=False):
        part = part.sort_values("recurrences")
        trained = int(part["trained_recurrences"].iloc[0])
        at_train = part[part["recurrences"] == trained]
        if at_train.empty:
            continue
        at_train, at_max = at_train.iloc[0], part.iloc[-1]
        rows.append({"model": model, "trained": trained, "r_max": int(at_max["recurrences"]),
                     "converges": bool(fixed_share(at_max) > th.majority), "fixed_point": fixed_share(at_max),
                     "change": at_max["successive_change"],
                     "align_train": at_train["alignment_corr"], "align_max": at_max["alignment_corr"],
                     "loss_train": at_train["loss"], "loss_max": at_max["loss"],
                     "acc_train": at_train["accuracy"], "acc_max": at_max["accuracy"]})
    return pd.DataFrame(rows)


def extrapolated(m: Measurements, th: Thresholds, converging: bool) -> pd.DataFrame | Verdict:
    """`extrapolation_rows` of the models that converge (or do not) at the largest R; a not-measurable Verdict
    when the table is missing or no model falls in the group."""
    if (v := missing(m, "extrapolate")) is not None:
        return v
    rows = extrapolation_rows(m, th)
    group = rows[rows["converges"] == converging] if len(rows) else rows
    if group.empty:
        return Verdict(NOT_MEASURABLE, "no model has most tokens at a fixed point at the largest R" if converging
                       else "every model converges at the largest R: no non-converging model to test")
    return group


def change_at(m: Measurements, r) -> tuple[float, float, float]:
    """The last block layer's relative change at the model's largest R: mean over prompts and its 95 % bootstrap
    over prompts (`extrapolate_per_prompt`); NaN bounds without that table."""
    from loopscope.evidence import bootstrap_mean

    units = m.get("extrapolate_per_prompt")
    if units is None or units.empty:
        return float(r.change), math.nan, math.nan
    x = units[(units["model"] == r.model) & (units["recurrences"] == r.r_max)]["successive_change"]
    return bootstrap_mean(x.to_numpy()) if len(x) else (float(r.change), math.nan, math.nan)


def loss_rise(m: Measurements, r) -> tuple[float, float, float]:
    """loss(R_max) − loss(R_train), nats: the mean over held-out sequences of each one's own rise and its paired
    95 % bootstrap over sequences (`extrapolate_per_text`); NaN bounds without that table."""
    from loopscope.evidence import bootstrap_mean

    units = m.get("extrapolate_per_text")
    point = float(r.loss_max - r.loss_train)
    if units is None or units.empty:
        return point, math.nan, math.nan
    own = units[units["model"] == r.model].pivot_table(index="text", columns="recurrences", values="loss")
    if r.r_max not in own or r.trained not in own:
        return point, math.nan, math.nan
    return bootstrap_mean((own[r.r_max] - own[r.trained]).to_numpy())


def judged_models(rows: pd.DataFrame, stats: list[tuple[float, float, float]], threshold: float, above_holds: bool,
                  what: str) -> tuple[str, str, tuple[float, float, float]]:
    """(verdict, evidence, the worst model's stats) for one effect per model, every model needing its interval on
    the paper's side of `threshold` (`combine_verdicts`)."""
    verdicts = [interval_side(st, threshold, above_holds) for st in stats]
    worst = min(stats, key=lambda st: st[1]) if above_holds else max(stats, key=lambda st: st[2])
    ev = "; ".join(f"{r.model} R {r.trained}→{r.r_max}: {what} {fmt(st[0])} [{fmt(st[1])}, {fmt(st[2])}] ({v})"
                   for r, st, v in zip(rows.itertuples(), stats, verdicts))
    return combine_verdicts(verdicts), ev, worst


def rule_extrapolation_stable(m: Measurements, th: Thresholds) -> Verdict:
    """Per converging model: the last layer's change at the largest R (`change_at`), surely below
    `extrapolation_change`. The stages' alignment with the control at R_train and R_max is shown, not judged: it is
    one correlation of prompt-averaged profiles per R, with no interval."""
    conv = extrapolated(m, th, converging=True)
    if isinstance(conv, Verdict):
        return conv
    stats = [change_at(m, r) for r in conv.itertuples()]
    verdict, ev, worst = judged_models(conv, stats, th.extrapolation_change, False, "change")
    align = ", ".join(f"{r.model} {fmt(r.align_train)}→{fmt(r.align_max)}" for r in conv.itertuples())
    return Verdict(verdict, f"relative change of the last block layer at the largest R, 95 % bootstrap over prompts, "
                   f"stable below {fmt(th.extrapolation_change)}: {ev}. Stage alignment r (shown, not judged): {align}",
                   names(conv), *worst)


def rule_extrapolation_unstable(m: Measurements, th: Thresholds) -> Verdict:
    """Per non-converging model: its change at the largest R surely above `extrapolation_change`."""
    rest = extrapolated(m, th, converging=False)
    if isinstance(rest, Verdict):
        return rest
    stats = [change_at(m, r) for r in rest.itertuples()]
    verdict, ev, worst = judged_models(rest, stats, th.extrapolation_change, True, "change")
    return Verdict(verdict, "non-converging models (fixed-point tokens "
                   + ", ".join(f"{r.model} {fmt(r.fixed_point)}" for r in rest.itertuples())
                   + f"), unstable when the change is surely above {fmt(th.extrapolation_change)}: {ev}",
                   names(rest), *worst)


def rule_extrapolation_performance(m: Measurements, th: Thresholds) -> Verdict:
    """Per converging model: the held-out loss rise from R_train to R_max (`loss_rise`), surely below `loss_drift`."""
    conv = extrapolated(m, th, converging=True)
    if isinstance(conv, Verdict):
        return conv
    stats = [loss_rise(m, r) for r in conv.itertuples()]
    verdict, ev, worst = judged_models(conv, stats, th.loss_drift, False, "loss rise (nats)")
    acc = ", ".join(f"{r.model} {fmt(r.acc_train)}→{fmt(r.acc_max)}" for r in conv.itertuples())
    return Verdict(verdict, f"held-out loss rise at the largest R, paired 95 % bootstrap over sequences, kept below "
                   f"{fmt(th.loss_drift)} nats: {ev}. Exact match (shown): {acc}", names(conv), *worst)


def non_fixed_interval(row: pd.Series) -> tuple[float, float]:
    """The no-fixed-point rate's 95 % interval: the wider, at each end, of the bootstrap over questions (tokens of a
    question share its context) and the exact binomial interval of the pooled count (`evidence.clopper_pearson`;
    the bootstrap collapses to [0, 0] when no token was seen, which would call any rate 'surely below')."""
    from loopscope.evidence import clopper_pearson

    n = int(row["n"])
    k = int(round(n * (1.0 - fixed_share(row))))
    cp_lo, cp_hi = clopper_pearson(k, n)
    boot = (float(row["non_fixed_low"]), float(row["non_fixed_high"])) if "non_fixed_low" in row else (cp_lo, cp_hi)
    return min(boot[0], cp_lo), max(boot[1], cp_hi)


def rule_rare(m: Measurements, th: Thresholds) -> Verdict:
    """Effect: the non-fixed-point rate without a system prompt; holds when its interval (`non_fixed_interval`) is
    below `rare` (0.14 %), differs when above, else inconclusive. With no non-fixed token among n, the upper bound is
    ≈ 3.7 / n: about 2,600 question tokens are needed before 0 of n can say 'rare'."""
    if (v := missing(m, "conditions")) is not None:
        return v
    c = m["conditions"]
    c = c[(c["method"] == th.condition_method) & (c["condition"] == "none")]
    if c.empty:
        return Verdict(NOT_MEASURABLE, "the no-system-prompt condition was not run")
    row = c.iloc[0]
    rate = 1.0 - fixed_share(row)
    lo, hi = non_fixed_interval(row)
    return Verdict(side(lo, hi, th.rare, above_holds=False),
                   f"non-fixed-point tokens without a system prompt {rate:.3%} [{lo:.3%}, {hi:.3%}] of {int(row['n'])} "
                   f"question tokens (95 %: bootstrap over questions widened to the exact binomial interval; rare = "
                   f"below {th.rare:.2%}, the paper measured 0.02 %), {th.condition_method} classifier",
                   effect=rate, ci_low=lo, ci_high=hi)


def paired_rate_difference(q: pd.DataFrame, a: str, b: str) -> tuple[float, float, float]:
    """rate(a) − rate(b) of non-fixed-point tokens with the paired bootstrap over the questions run under both
    (`evidence.bootstrap_ratio_difference`)."""
    from loopscope.evidence import bootstrap_ratio_difference

    both = q[q["condition"] == a].merge(q[q["condition"] == b], on="question", suffixes=("_a", "_b"))
    return bootstrap_ratio_difference(both["non_fixed_a"], both["n_a"], both["non_fixed_b"], both["n_b"])


def rule_persona(m: Measurements, th: Thresholds) -> Verdict:
    """Two effects, each with a paired bootstrap over the same questions: rate(long persona) − rate(none) and
    rate(long persona) − rate(same-length padding); holds when both intervals are above 0, differs when one is
    below, else inconclusive. The row's effect is the first."""
    if (v := missing(m, "conditions", "conditions_by_question")) is not None:
        return v
    q = m["conditions_by_question"]
    q = q[q["method"] == th.condition_method]
    need = ("none", "long-persona", "long-persona-padded")
    if any(n not in set(q["condition"]) for n in need):
        return Verdict(NOT_MEASURABLE, f"conditions run: {sorted(set(q['condition']))}; needs {list(need)}")
    rates = {n: q.loc[q["condition"] == n, "non_fixed"].sum() / q.loc[q["condition"] == n, "n"].sum() for n in need}
    ev = ", ".join(f"{n} {rates[n]:.3%}" for n in need) + f" ({th.condition_method} classifier)"
    if all(rates[n] == 0 for n in need):
        return Verdict(NOT_MEASURABLE, f"no non-fixed-point tokens under any condition: {ev}")
    effects = {f"persona − {b}": paired_rate_difference(q, "long-persona", b) for b in ("none", "long-persona-padded")}
    verdicts = [side(lo, hi, 0.0) for _, lo, hi in effects.values()]
    parts = "; ".join(f"{k} {d:+.3%} [{lo:+.3%}, {hi:+.3%}]" for k, (d, lo, hi) in effects.items())
    first = effects["persona − none"]
    return Verdict(combine_verdicts(verdicts), f"non-fixed-point tokens: {ev}; {parts} (95 % paired bootstrap over "
                   f"{q['question'].nunique()} questions)", effect=first[0], ci_low=first[1], ci_high=first[2])


def kept_fraction(row) -> float:
    """How much of the stages an ablation keeps: the larger of the measured kept fractions (mean sink rate and mean
    ColSum concentration after / before; NaN where the metric was 0 before). Small = the stages were removed."""
    kept = [k for k in (row.sink_rate_kept, row.colsum_concentration_kept) if not math.isnan(k)]
    return max(kept) if kept else math.nan


def describe_ablation(r) -> str:
    return (f"{r.model} ({r.kind}): peak/median |x| {fmt(r.massive_ratio_before)} → {fmt(r.massive_ratio_after)} "
            f"after zeroing {r.segment} layer {r.layer}'s MLP; sink rate "
            + ("0 before (no sinks)" if math.isnan(r.sink_rate_kept) else f"×{fmt(r.sink_rate_kept)}") + ", ColSum "
            f"concentration ×{fmt(r.colsum_concentration_kept)}, KL {fmt(r.mean_kl)} nats")


NO_ABLATION_THRESHOLD = ("no threshold for 'removes the stages' was fixed before an ablation was seen (the one "
                         "considered, ≤ ×0.6, came after SmolLM2's ×0.27 / ×0.52): the effect is reported, no verdict")


def rule_massive_causal(m: Measurements, th: Thresholds) -> Verdict:
    """Measured on looped models with massive activations; effect: the largest `kept_fraction` among them (no
    interval: means over every state of the prompts), verdict `effect only` (`NO_ABLATION_THRESHOLD`). Without such
    a model: not measurable, with the looped control and the feedforward reference (SmolLM2) as evidence."""
    if (v := missing(m, "massive_ablation")) is not None:
        return v
    t = m["massive_ablation"]
    massive = t["massive_ratio_before"] >= th.massive
    judged = t[massive & (t["kind"] == "looped")]
    evidence = "; ".join(describe_ablation(r) for r in t.itertuples())
    if judged.empty:
        looped = t[t["kind"] == "looped"]
        why = ("no looped model here has massive activations (largest peak/median |x| "
               + ", ".join(f"{r.model} {fmt(r.massive_ratio_before)}" for r in looped.itertuples())
               + f" < {fmt(th.massive)})" if len(looped) else "no looped model was ablated")
        return Verdict(NOT_MEASURABLE, f"{why}; {evidence}", names(t))
    kept = max(kept_fraction(r) for r in judged.itertuples())
    return Verdict(EFFECT_ONLY, f"largest kept fraction of the stages {fmt(kept)}; {evidence}; "
                   + NO_ABLATION_THRESHOLD, names(judged), effect=kept)


def not_here(reason: str) -> Callable[[Measurements, Thresholds], Verdict]:
    return lambda m, th: Verdict(NOT_MEASURABLE, reason)


CLAIMS: list[Claim] = [
    Claim("settle", "§4.1, Fig. 3; headline 1", "In every looped model the per-layer residuals barely change between "
          "recurrences after a few passes.", rule_settle,
          figure='models/<model>: "Convergence of each block layer" (successive_change)'),
    Claim("cyclic-fixed-point", "§3.2 Prop. 4.1, Fig. 4; headline 2", "Looped models with input injection reach a "
          "cyclic fixed point: every block layer its own, distinct, fixed point.", rule_injection_cyclic,
          figure='models/<model>: "Cyclic or degenerate fixed point" (degeneracy_summary)'),
    Claim("injection-helps", "§4.3 (Bansal, Anil)", "Input injection encourages fixed-point convergence: the same "
          "model converges closer with injection than without.", rule_injection_helps,
          figure='claims_models table: last_layer_relative_change; models/<model>: successive_change'),
    Claim("distinct", "§3.2 (a)/(b)", "Trained looped models' per-layer fixed points are distinct (a cycle), not one "
          "degenerate shared point.", rule_distinct_not_degenerate,
          figure='models/<model>: "Cyclic or degenerate fixed point"'),
    Claim("attention-stabilises", "§4 items 1–2, Figs. 2, 23", "As states converge, each layer's attention pattern "
          "stops changing and matches itself across recurrences (diagonal bands).", rule_attention_stabilises,
          figure='models/<model>: attention_distance and attention_to_fixed_point figures'),
    Claim("prop-4.2", "§3.2 Prop. 4.2, App. A", "Attention change tracks state change and shrinks with it "
          "(the empirical content of the Lipschitz bound).", rule_attention_tracks_state,
          figure='models/<model>: Prop. 4.2 section (prop42 relation)'),
    Claim("stages-repeat", "§5 item 1, Figs. 7, 34", "The block re-enacts the same stage profile on every recurrence "
          "after a short transient.", rule_stages_repeat,
          figure='models/<model>: stage profiles by recurrence (colsum_concentration)'),
    Claim("stages-align", "§6.3, Fig. 10", "Looped models trained from scratch self-organise into feedforward-like "
          "mixing stages within each recurrence (vs the depth-12 control).", rule_stages_align,
          figure='models/<model>: stage alignment with the control (alignment)'),
    Claim("inject-final-pass", "§6.3, Figs. 57–59", "Adding input injection makes the final recurrence follow "
          "feedforward stages more closely, at the expense of earlier recurrences.", rule_injection_final_pass,
          figure='models/<model>: stage alignment per pass (alignment)'),
    Claim("noprelude-worse", "§6.3, Figs. 60–62", "Removing prelude/coda fits feedforward stages less well.",
          rule_noprelude_worse,
          figure='models/<model>: stage alignment (alignment)'),
    Claim("best-fit", "§6.3", "The closest replication of feedforward stages comes from no input injection plus "
          "prelude/coda.", rule_best_fit,
          figure='claims_models table: colsum_pearson_median'),
    Claim("sandwich-no-stages", "§5 items 2–3, Fig. 36", "Normalising the residual inside every block (Huginn "
          "sandwich norm) suppresses feedforward-like stages.", rule_sandwich_no_stages,
          figure='models/looped-4+sandwich-s<seed> beside models/looped-4-s<seed>: stage profiles'),
    Claim("massive-activations", "§5 item 3, Fig. 9", "Residual magnitudes and massive activations grow in pre-norm "
          "looped models; a sandwich norm on the residual keeps them down.", rule_massive,
          figure='models/<model>: residual norms / massive activations (stage profiles)'),
    Claim("massive-causal", "§5 item 4, Fig. 41", "Zeroing the MLP that creates massive activations removes the "
          "stages (massive activations are required).", rule_massive_causal,
          figure='"Massive-activation ablation" section'),
    Claim("grid-injection", "§4.2, §6.1, Fig. 6", "Random init, with input injection: a stable fixed point for every "
          "norm except Ouro's.", rule_grid(True),
          figure='"Architecture grid at random initialisation": grid_verdicts'),
    Claim("grid-no-injection", "§4.2, §6.1, Fig. 6", "Random init, without injection: only pre-norm reaches a stable "
          "fixed point, and it is degenerate.", rule_grid(False),
          figure='"Architecture grid at random initialisation": grid_verdicts'),
    Claim("grid-block-size", "§6.1, Fig. 31", "Blocks of 4 and 16 layers behave qualitatively as 12 layers.",
          rule_grid_block_size,
          figure='"Architecture grid at random initialisation": grid_cells, grid_min_cosine'),
    Claim("extrapolation-stable", "§6.2, Figs. 11, 47–49", "Models that converge to a fixed point keep enacting the "
          "same (stable) stages at test-time recurrences far beyond training.", rule_extrapolation_stable,
          figure='"Extrapolation" section: extrapolate_metrics'),
    Claim("extrapolation-unstable", "§6.2, Figs. 12, 50–52", "A model that does not converge (Ouro) has unstable "
          "stages when extrapolated.", rule_extrapolation_unstable,
          figure='"Extrapolation" section: extrapolate_metrics'),
    Claim("extrapolation-performance", "§6.2 (cited, not measured)", "Task performance under extrapolation tracks "
          "convergence: converging models keep their performance.", rule_extrapolation_performance,
          figure='"Extrapolation" section: extrapolate_table'),
    Claim("rare-non-fixed", "App. C.1, §7", "Without a system prompt, tokens that do not reach a fixed point are rare "
          "(≈ 0.02 %).", rule_rare,
          figure='"System-prompt conditions" section'),
    Claim("persona", "App. C.1, §7", "A long persona system prompt raises orbit/slider rates, more than a "
          "same-length padding prompt.", rule_persona,
          figure='"System-prompt conditions" section'),
    Claim("cooccurrence", "App. C.2, Fig. 14", "Orbits and sliders never co-occur across the block layers of one "
          "token.", rule_cooccurrence,
          figure='models/<model>: cooccurrence matrix'),
]


from loopscope.experiments.pretrained_claims import PRETRAINED_CLAIMS  # noqa: E402
from loopscope.experiments.retrofit_claims import RETROFIT_CLAIMS  # noqa: E402  (its rules use the helpers above)

CLAIMS += PRETRAINED_CLAIMS + RETROFIT_CLAIMS


# Sanity checks: rows that can fail only if the code (or the model's arithmetic) is wrong — a theorem checked
# numerically, or an implication nearly guaranteed by any deterministic recurrence. Reported apart from the claims.
CHECKS: list[Claim] = [
    Claim("prop-4.1", "§3.2 Prop. 4.1", "Once the block's last layer has converged (every token), every layer has "
          "(cyclic permutations share the fixed point).", rule_prop41,
          figure='models/<model>: cyclic_fixed_point_check table'),
    Claim("prop-4.2-bound", "§3.2 Prop. 4.2, App. A", "Attention change is bounded by L_sm·(2Bκ/√d)·‖ΔX‖ with "
          "L_sm = 1/2 (measured/bound ≤ 1).", rule_prop42,
          figure='models/<model>: Prop. 4.2 section (prop42 table)'),
]


def evaluate_checks(m: Measurements, th: Thresholds | None = None) -> pd.DataFrame:
    """The sanity checks (`CHECKS`), in the claims table's columns."""
    return _evaluate(CHECKS, m, th or Thresholds())


def evaluate_claims(m: Measurements, th: Thresholds | None = None) -> pd.DataFrame:
    """One row per claim (in `CLAIMS` order): id, source, claim, verdict, evidence, measured_on."""
    return _evaluate(CLAIMS, m, th or Thresholds())


def _evaluate(claims: list[Claim], m: Measurements, th: Thresholds) -> pd.DataFrame:
    rows = []
    for c in claims:
        v = c.rule(m, th)
        if v.verdict not in VERDICTS:
            raise ValueError(f"rule {c.id} returned {v.verdict!r}")
        rows.append({"id": c.id, "source": c.source, "claim": c.text, "verdict": v.verdict, "effect": v.effect,
                     "ci_low": v.ci_low, "ci_high": v.ci_high, "evidence": v.evidence, "measured_on": v.measured_on,
                     "figure": c.figure})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def verdict_counts(claims: pd.DataFrame) -> dict[str, int]:
    """How many claims got each verdict (every verdict named, zero when none did)."""
    counts = claims["verdict"].value_counts()
    return {v: int(counts.get(v, 0)) for v in (HOLDS, DIFFERS, INCONCLUSIVE, NOT_MEASURABLE, EFFECT_ONLY)}


# Why each threshold has its value, where it comes from, and when it was fixed: "a priori" = before any run of the
# rule it serves; "after seeing data" says so (such a row is no blind test). One entry per `Thresholds` field.
THRESHOLD_REASONS: dict[str, tuple[str, str, str]] = {
    "settled": ("a change below 1 % of the state's norm is 'barely changing'", "ours (the paper gives no number)",
                "a priori"),
    "fixed_point": ("a layer at its fixed point moves < 0.1 % per recurrence", "= dynamics.degeneracy converge_tol",
                    "a priori"),
    "majority": ("'reach a cyclic fixed point' read as: more than half of the tokens do", "ours", "a priori"),
    "degenerate_cosine": ("two layers' fixed points at cosine ≥ 0.99 are one point", "the paper's Fig. 6 test; "
                          "dynamics.degeneracy.SAME_POINT_COSINE", "a priori"),
    "prop41_factor": ("a Lipschitz block spreads a residual change by a bounded factor; 10× of fixed_point",
                      "ours (Prop. 4.1 gives no constant)", "a priori"),
    "diagonal_band": ("'diagonal bands': 90 % of patterns nearest their own layer", "ours (Fig. 2 is read by eye)",
                      "a priori"),
    "attention_shrink": ("attention change at least halves from the first to the last recurrence", "ours (Fig. 23)",
                         "a priori"),
    "prop42_ratio": ("the bound itself: measured/bound ≤ 1", "Prop. 4.2 (a theorem: a check, not a claim)",
                     "a priori"),
    "tracks": ("a monotone relation ordering most check pairs alike: Spearman ρ > 0.5", "ours (no number in the "
               "paper)", "a priori"),
    "aligned": ("a pass follows the feedforward stages at Pearson r ≥ 0.5", "ours (Fig. 10 is read by eye)",
                "a priori"),
    "repeat_error": ("a profile repeats when passes differ by ≤ 25 % of the metric's spread", "ours (Fig. 7)",
                     "a priori"),
    "extrapolation_change": ("still settled at the largest R: the same 1 % as `settled`", "ours", "a priori"),
    "loss_drift": ("performance kept: held-out loss at most 0.1 nats worse", "ours", "a priori"),
    "loop_gain": ("a healed retrofit uses its loop: R = 8 surely 0.05 nats better than R = 1", "issue 11's target",
                  "a priori (before healing)"),
    "massive": ("massive activations: peak/median |x| ≥ 100", "Sun et al. 2024 (10³–10⁴); stages.massive",
                "a priori"),
    "rare": ("'rare' non-fixed-point tokens: below 0.14 %, the largest rate the paper itself calls rare",
             "paper App. C.1: 0.02 % (no system prompt), 0.14 % (long persona)", "a priori (the paper's number)"),
    "condition_method": ("the App. C claims use the paper's own heuristic (τ = 0.05, ρ = 0.9 at R = 128)",
                         "paper App. C", "a priori"),
}


def thresholds_table(th: Thresholds | None = None) -> pd.DataFrame:
    """The thresholds used, one row each (for the report): threshold, value, reason, source, fixed (when)."""
    rows = []
    for k, v in asdict(th or Thresholds()).items():
        reason, source, when = THRESHOLD_REASONS[k]
        rows.append({"threshold": k, "value": v, "reason": reason, "source": source, "fixed": when})
    return pd.DataFrame(rows)
