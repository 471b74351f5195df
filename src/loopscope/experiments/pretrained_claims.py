"""The paper's claims about its pretrained models, as rules over the tables of `experiments.pretrained_study`
(`pretrained_measurements`), judged per model: a model not given makes only its own rows "not measurable here".

Every effect has a 95 % bootstrap interval over PROMPTS (GSM8K questions; `loopscope.evidence`, seed 0), never over
layers or recurrences; the verdict is `holds` / `differs` only when the interval lies on one side of its threshold
(`claims.Thresholds`), `inconclusive` otherwise. The App. C rows on Huginn reuse the toy study's rules
(`claims.rule_rare`, `rule_persona`, `rule_cooccurrence`) on Huginn's tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopscope.evidence import bootstrap_mean, bootstrap_ratio
from loopscope.experiments.claims import (
    NOT_MEASURABLE,
    Claim,
    Measurements,
    Thresholds,
    Verdict,
    combine_verdicts,
    fmt,
    rule_cooccurrence,
    rule_persona,
    rule_rare,
    side,
)

HOW = "loopscope reproduce --pretrained --looped {family}=PATH"


def ci(x: float, lo: float, hi: float) -> str:
    return f"{fmt(x)} [{fmt(lo)}, {fmt(hi)}]"


def given(m: Measurements, family: str) -> pd.Series | Verdict:
    """The family's row of `pretrained_models`, or a not-measurable verdict saying how to measure it."""
    t = m.get("pretrained_models")
    rows = t[t["family"] == family] if t is not None and len(t) else pd.DataFrame()
    if rows.empty:
        return Verdict(NOT_MEASURABLE, f"no {family} checkpoint was given ({HOW.format(family=family)}); a builtin "
                       "or toy model never stands in for it")
    return rows.iloc[0]


def who(row: pd.Series) -> str:
    if bool(row["stand_in"]):
        return (f"{row['model']} (the builtin healed SmolLM2 retrofit, standing in: no retrofit checkpoint was "
                "given)")
    return str(row["model"])


def label(row: pd.Series) -> str:
    """The model's part as the evidence names it; the stand-in says so in the row's text."""
    return f"{row['family']} (stand-in: {row['model']})" if bool(row["stand_in"]) else str(row["family"])


def units(m: Measurements, table: str, family: str) -> pd.DataFrame:
    t = m.get(table)
    return t[t["family"] == family] if t is not None and len(t) and "family" in t else pd.DataFrame()


def rule_fixed_points(family: str, reaches: bool):
    """Huginn / retrofit (`reaches`): the share of tokens whose block layers reach distinct per-layer fixed points
    (`dynamics.degeneracy`) is surely above `majority`. Ouro (not `reaches`): the share reaching a fixed point at
    all is surely below it. Pooled over tokens, bootstrap over prompts."""
    column = "distinct" if reaches else "converged"

    def rule(m: Measurements, th: Thresholds) -> Verdict:
        row = given(m, family)
        if isinstance(row, Verdict):
            return row
        u = units(m, "pretrained_fixed_points", family)
        if u.empty:
            return Verdict(NOT_MEASURABLE, "no per-prompt fixed-point table", who(row))
        x, lo, hi = bootstrap_ratio(u[column].to_numpy(), u["tokens"].to_numpy())
        what = ("with distinct per-layer fixed points" if reaches else "at a fixed point (last block layer's "
                f"relative step < {fmt(th.fixed_point)})")
        return Verdict(side(lo, hi, th.majority, above_holds=reaches),
                       f"{label(row)} at R = {int(row['recurrences'])}: share of {int(u['tokens'].sum())} tokens of "
                       f"{len(u)} prompts {what} {ci(x, lo, hi)} (95 % bootstrap over prompts; holds when "
                       f"{'above' if reaches else 'below'} {fmt(th.majority)})", who(row), x, lo, hi)
    return rule


def prompt_alignment(u: pd.DataFrame) -> np.ndarray:
    """Per prompt: the median over passes of the ColSum Pearson r with the reference (prompts with no finite r
    dropped: a flat profile has none)."""
    med = u.groupby("prompt")["pearson"].median()
    return med.dropna().to_numpy()


def rule_stages(family: str, follows: bool):
    """Ouro / retrofit (`follows`): the per-prompt median over passes of the Pearson r between each pass's ColSum
    profile and the feedforward reference's depth profile of the same prompt, averaged over prompts, surely above
    `aligned`. Huginn (not `follows`, "no clear stages"): surely below it."""

    def rule(m: Measurements, th: Thresholds) -> Verdict:
        row = given(m, family)
        if isinstance(row, Verdict):
            return row
        u = units(m, "pretrained_alignment", family)
        if u.empty:
            return Verdict(NOT_MEASURABLE, f"no feedforward reference to align {family}'s stages with (give "
                           "--feedforward llama=PATH)", who(row))
        per = prompt_alignment(u)
        if not len(per):
            return Verdict(NOT_MEASURABLE, "no finite alignment (flat profiles)", who(row))
        x, lo, hi = bootstrap_mean(per)
        return Verdict(side(lo, hi, th.aligned, above_holds=follows),
                       f"{label(row)} vs {u['reference'].iloc[0]}: ColSum profile of each of "
                       f"{u['recurrence'].nunique()} passes against the reference's depth profile of the same "
                       f"prompt, median Pearson r over passes, mean over {len(per)} prompts {ci(x, lo, hi)} (95 % "
                       f"bootstrap over prompts; holds when {'above' if follows else 'below'} {fmt(th.aligned)})",
                       who(row), x, lo, hi)
    return rule


def change_stats(m: Measurements, family: str) -> tuple[pd.Series, tuple[float, float, float]] | Verdict:
    row = given(m, family)
    if isinstance(row, Verdict):
        return row
    u = units(m, "pretrained_change", family)
    if u.empty:
        return Verdict(NOT_MEASURABLE, "no per-prompt change table", who(row))
    if int(row["recurrences"]) <= int(row["trained_recurrences"]):
        return Verdict(NOT_MEASURABLE, f"R = {int(row['recurrences'])} does not go beyond {family}'s training "
                       f"recurrences ({int(row['trained_recurrences'])}): no extrapolation", who(row))
    return row, bootstrap_mean(u["change"].to_numpy())


def describe_change(row: pd.Series, st: tuple[float, float, float]) -> str:
    return (f"{label(row)} R {int(row['trained_recurrences'])}→{int(row['recurrences'])} "
            f"({int(row['recurrences']) / int(row['trained_recurrences']):.3g}× its training R): {ci(*st)}")


def rule_extrapolation_ouro(m: Measurements, th: Thresholds) -> Verdict:
    """§6.2, Ouro the unstable case: the last block layer's relative step at R (far beyond its 4 training
    recurrences), mean over a prompt's tokens, averaged over prompts, surely above `extrapolation_change`."""
    got = change_stats(m, "ouro")
    if isinstance(got, Verdict):
        return got
    row, st = got
    return Verdict(side(st[1], st[2], th.extrapolation_change, above_holds=True),
                   "relative step of the last block layer at the last recurrence, 95 % bootstrap over prompts, "
                   f"unstable when surely above {fmt(th.extrapolation_change)}: " + describe_change(row, st),
                   who(row), *st)


def rule_extrapolation_stable(m: Measurements, th: Thresholds) -> Verdict:
    """§6.2, the converging models (Huginn, retrofit; each one given): the same step surely below
    `extrapolation_change`; holds when every given model's does. The row's effect is the worst model's."""
    judged = [(f, got) for f in ("huginn", "retrofit") if not isinstance(got := change_stats(m, f), Verdict)]
    if not judged:
        return Verdict(NOT_MEASURABLE, "neither a huginn nor a retrofit model was measured beyond its training "
                       f"recurrences ({HOW.format(family='huginn')})")
    verdicts = [side(st[1], st[2], th.extrapolation_change, above_holds=False) for _, (_, st) in judged]
    worst = max((st for _, (_, st) in judged), key=lambda st: st[2])
    ev = "; ".join(f"{describe_change(row, st)} ({v})" for (_, (row, st)), v in zip(judged, verdicts))
    return Verdict(combine_verdicts(verdicts), "relative step of the last block layer at the last recurrence, 95 % "
                   f"bootstrap over prompts, stable when surely below {fmt(th.extrapolation_change)}: {ev}",
                   "; ".join(who(row) for _, (row, _) in judged), *worst)


def on_huginn(rule, tables: dict[str, str]):
    """A toy-study rule applied to Huginn's tables (`tables`: the rule's table name → the pretrained table)."""

    def wrapped(m: Measurements, th: Thresholds) -> Verdict:
        row = given(m, "huginn")
        if isinstance(row, Verdict):
            return row
        v = rule({k: m[src] for k, src in tables.items() if src in m}, th)
        return Verdict(v.verdict, f"huginn: {v.evidence}", who(row), v.effect, v.ci_low, v.ci_high)
    return wrapped


def huginn_model(m: Measurements) -> Measurements:
    t = m.get("pretrained_models")
    return {"models": t[t["family"] == "huginn"]} if t is not None and len(t) else {}


def rule_cooccurrence_huginn(m: Measurements, th: Thresholds) -> Verdict:
    row = given(m, "huginn")
    if isinstance(row, Verdict):
        return row
    v = rule_cooccurrence(huginn_model(m), th)
    return Verdict(v.verdict, f"huginn at R = {int(row['recurrences'])}: {v.evidence}", who(row), v.effect,
                   v.ci_low, v.ci_high)


def rule_massive(family: str, has: bool):
    """§5 item 3, Fig. 9: the largest peak/median |x| over a prompt's states, averaged over prompts: surely above
    `massive` for the retrofit (pre-norm: massive activations grow), surely below for Huginn (its sandwich norm
    keeps the residual down)."""

    def rule(m: Measurements, th: Thresholds) -> Verdict:
        row = given(m, family)
        if isinstance(row, Verdict):
            return row
        u = units(m, "pretrained_massive", family)
        if u.empty:
            return Verdict(NOT_MEASURABLE, "no per-prompt stage profiles", who(row))
        x, lo, hi = bootstrap_mean(u["massive_ratio"].to_numpy())
        return Verdict(side(lo, hi, th.massive, above_holds=has),
                       f"{label(row)}: largest peak/median |x| over a prompt's states, mean over {len(u)} prompts "
                       f"{ci(x, lo, hi)} (95 % bootstrap over prompts; holds when {'above' if has else 'below'} "
                       f"{fmt(th.massive)})", who(row), x, lo, hi)
    return rule


def rule_massive_causal_retrofit(m: Measurements, th: Thresholds) -> Verdict:
    """§5 item 4, Fig. 41 on the retrofit: `retrofit_claims.rule_massive_causal` (effect only: no threshold for
    'removes the stages' was fixed before an ablation was seen) on its ablation table."""
    from loopscope.experiments.retrofit_claims import rule_massive_causal

    row = given(m, "retrofit")
    if isinstance(row, Verdict):
        return row
    v = rule_massive_causal({"retrofit_ablation": m["pretrained_ablation"]} if "pretrained_ablation" in m else {},
                            th)
    return Verdict(v.verdict, f"{label(row)}: {v.evidence}", who(row), v.effect, v.ci_low, v.ci_high)


CONDITIONS = {"conditions": "pretrained_conditions", "conditions_by_question": "pretrained_conditions_by_question"}
SECTION = '"Pretrained checkpoints" section'

PRETRAINED_CLAIMS: list[Claim] = [
    Claim("pretrained-fixed-points-huginn", "§4 item 3, Fig. 4", "Huginn-0125 reaches distinct per-layer fixed "
          "points.", rule_fixed_points("huginn", True), figure=f"{SECTION}: pretrained_fixed_points; models/huginn"),
    Claim("pretrained-fixed-points-retrofit", "§4 item 3, Fig. 4", "Retrofitted Llama reaches distinct per-layer "
          "fixed points.", rule_fixed_points("retrofit", True),
          figure=f"{SECTION}: pretrained_fixed_points; models/retrofit"),
    Claim("pretrained-fixed-points-ouro", "§4 item 3, Fig. 4", "Ouro 1.4B does not reach a fixed point.",
          rule_fixed_points("ouro", False), figure=f"{SECTION}: pretrained_fixed_points; models/ouro"),
    Claim("pretrained-stages-ouro", "§5 item 2, Fig. 8", "Ouro mirrors Llama's mixing stages inside every "
          "recurrence.", rule_stages("ouro", True), figure=f"{SECTION}: pretrained_alignment"),
    Claim("pretrained-stages-retrofit", "§5 item 2, Figs. 7, 40", "A retrofitted model follows its base model's "
          "stages.", rule_stages("retrofit", True), figure=f"{SECTION}: pretrained_alignment"),
    Claim("pretrained-stages-huginn", "§5 item 2, Fig. 36", "Huginn-0125 shows no clear stages.",
          rule_stages("huginn", False), figure=f"{SECTION}: pretrained_alignment"),
    Claim("pretrained-extrapolation-ouro", "§6.2, Figs. 12, 50–52", "Ouro, which does not converge, is unstable "
          "when extrapolated beyond its training recurrences.", rule_extrapolation_ouro,
          figure=f"{SECTION}: pretrained_change"),
    Claim("pretrained-extrapolation-stable", "§6.2, Figs. 11, 47–49", "Huginn and the retrofitted model stay at "
          "their fixed points far beyond their training recurrences.", rule_extrapolation_stable,
          figure=f"{SECTION}: pretrained_change"),
    Claim("pretrained-rare-huginn", "App. C.1", "On Huginn-0125 without a system prompt, tokens that do not reach a "
          "fixed point are rare (≈ 0.02 %).", on_huginn(rule_rare, CONDITIONS),
          figure=f"{SECTION}: pretrained_conditions"),
    Claim("pretrained-persona-huginn", "App. C.1", "On Huginn-0125 a long persona system prompt raises orbit/slider "
          "rates, more than a same-length padding prompt.", on_huginn(rule_persona, CONDITIONS),
          figure=f"{SECTION}: pretrained_conditions"),
    Claim("pretrained-cooccurrence-huginn", "App. C.2, Fig. 14", "On Huginn-0125 orbits and sliders never co-occur "
          "across the block layers of one token.", rule_cooccurrence_huginn,
          figure=f"{SECTION}: pretrained_models; models/huginn: cooccurrence"),
    Claim("pretrained-massive-retrofit", "§5 item 3, Fig. 9", "The retrofitted (pre-norm) model has massive "
          "activations.", rule_massive("retrofit", True), figure=f"{SECTION}: pretrained_massive"),
    Claim("pretrained-massive-huginn", "§5 item 3, Fig. 9", "Huginn's sandwich norm keeps massive activations "
          "from forming.", rule_massive("huginn", False), figure=f"{SECTION}: pretrained_massive"),
    Claim("pretrained-massive-causal", "§5 item 4, Fig. 41", "In the retrofitted model, zeroing the MLP that "
          "creates massive activations removes the stages.", rule_massive_causal_retrofit,
          figure=f"{SECTION}: pretrained_ablation"),
]
