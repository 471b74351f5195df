"""The paper's retrofit claims as rules over the tables of `experiments.retrofit_study` (measured on the healed
looped SmolLM2 against SmolLM2). Each is an effect with its interval; the verdict is `holds` or `differs` only when
the interval is on one side of the threshold, `inconclusive` otherwise.

Tables read (any missing → "not measurable here"):

    retrofit             one row: fraction_converged/_distinct (+ _lo, _hi: 95 % bootstrap over prompts), tokens,
                         prompts, recurrences, alignment_median/_lo/_hi (Pearson r of each pass's ColSum profile with
                         SmolLM2's depth profile; interval over passes), alignment_last, stage_repeat_error,
                         attention_self_match, attention_shrink, massive_ratio
    retrofit_alignment_by_prompt  per (prompt, recurrence): Pearson r of the pass's ColSum profile with SmolLM2's
                         depth profile of the same prompt — the stage row's units (bootstrap over prompts)
    retrofit_attention_by_prompt  per prompt: self_match, the share of its patterns whose nearest pattern from
                         another recurrence is in the same layer — the attention row's units
    retrofit_ablation    `intervene.massive_ablation_tables` summary row of the looped model
    retrofit_extrapolate `retrofit_study.extrapolation_summary`: per (model, R) loss, accuracy and their intervals
"""

from __future__ import annotations

import math

import pandas as pd

from loopscope.evidence import bootstrap_mean
from loopscope.experiments.claims import (
    EFFECT_ONLY,
    INCONCLUSIVE,
    NO_ABLATION_THRESHOLD,
    NOT_MEASURABLE,
    Claim,
    Measurements,
    Thresholds,
    Verdict,
    fmt,
    kept_fraction,
    missing,
    side,
)


def ci(x: float, lo: float, hi: float) -> str:
    return f"{fmt(x)} [{fmt(lo)}, {fmt(hi)}]"


def rule_fixed_points(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "retrofit")) is not None:
        return v
    r = m["retrofit"].iloc[0]
    verdict = side(r.fraction_distinct_lo, r.fraction_distinct_hi, th.majority)
    return Verdict(verdict, f"at R = {int(r.recurrences)}, {int(r.tokens)} tokens of {int(r.prompts)} prompts: "
                   f"last block layer at a fixed point (relative step < {fmt(th.fixed_point)}) "
                   f"{ci(r.fraction_converged, r.fraction_converged_lo, r.fraction_converged_hi)}, with distinct "
                   f"per-layer points {ci(r.fraction_distinct, r.fraction_distinct_lo, r.fraction_distinct_hi)} "
                   f"(95 % bootstrap over prompts; holds when the interval is above {fmt(th.majority)})", str(r.model),
                   r.fraction_distinct, r.fraction_distinct_lo, r.fraction_distinct_hi)


def rule_attention(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "retrofit")) is not None:
        return v
    r = m["retrofit"].iloc[0]
    units = m.get("retrofit_attention_by_prompt")
    if units is not None and len(units):  # the share per prompt, resampled over prompts
        per = units["self_match"].dropna().to_numpy(dtype=float)
        if not len(per):
            return Verdict(NOT_MEASURABLE, "too few recurrences with attention", str(r.model))
        x, lo, hi = bootstrap_mean(per)
        return Verdict(side(lo, hi, th.diagonal_band), f"share of each prompt's (recurrence, layer) patterns whose "
                       f"nearest pattern from another recurrence is in the same layer, mean over {len(per)} prompts "
                       f"{ci(x, lo, hi)} (95 % bootstrap over prompts; holds above {fmt(th.diagonal_band)}); shown, "
                       f"not judged: distance to the final pattern left one pass before the end "
                       f"{fmt(r.attention_shrink)} of the first pass's", str(r.model), x, lo, hi)
    if math.isnan(r.attention_self_match) or math.isnan(r.attention_shrink):
        return Verdict(NOT_MEASURABLE, "too few recurrences with attention", str(r.model))
    return Verdict(INCONCLUSIVE, f"no per-prompt units (`retrofit_attention_by_prompt`): nearest pattern in the same "
                   f"layer {fmt(r.attention_self_match)} of the patterns of all prompts — patterns of one prompt are "
                   f"not independent trials, so no interval decides; shrink {fmt(r.attention_shrink)}", str(r.model),
                   r.attention_self_match)


def rule_stages(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "retrofit")) is not None:
        return v
    r = m["retrofit"].iloc[0]
    repeat = "repeats" if r.stage_repeat_error <= th.repeat_error else "does not repeat"
    units = m.get("retrofit_alignment_by_prompt")
    if units is not None and len(units):  # per prompt: the median over passes; resampled over prompts
        from loopscope.experiments.pretrained_claims import prompt_alignment  # the pretrained rows' units, the same

        per = prompt_alignment(units)
        if not len(per):
            return Verdict(NOT_MEASURABLE, "no finite alignment (flat profiles)", str(r.model))
        x, lo, hi = bootstrap_mean(per)
        return Verdict(side(lo, hi, th.aligned), f"ColSum profile of each of {units['recurrence'].nunique()} passes "
                       f"vs SmolLM2's depth profile of the same prompt: median Pearson r over passes, mean over "
                       f"{len(per)} prompts {ci(x, lo, hi)} (95 % bootstrap over prompts; holds above "
                       f"{fmt(th.aligned)}); the block's profile {repeat} from pass to pass (RMS difference "
                       f"{fmt(r.stage_repeat_error)} of ColSum's spread, threshold {fmt(th.repeat_error)}; shown, not "
                       "judged)", str(r.model), x, lo, hi)
    return Verdict(INCONCLUSIVE, f"no per-prompt units (`retrofit_alignment_by_prompt`): ColSum profile per pass vs "
                   f"SmolLM2's depth profile, median Pearson r {fmt(r.alignment_median)} over {int(r.passes)} passes "
                   f"of one model — passes are not independent trials, so no interval decides; the block's profile "
                   f"{repeat} from pass to pass", str(r.model), r.alignment_median)


def rule_massive_causal(m: Measurements, th: Thresholds) -> Verdict:
    if (v := missing(m, "retrofit_ablation")) is not None:
        return v
    r = m["retrofit_ablation"].iloc[0]
    if r.massive_ratio_before < th.massive:
        return Verdict(NOT_MEASURABLE, f"peak/median |x| {fmt(r.massive_ratio_before)} < {fmt(th.massive)}: no "
                       "massive activations to remove", str(r.model))
    return Verdict(EFFECT_ONLY, f"zeroing {r.segment} layer {r.layer}'s MLP at every pass: peak/median |x| "
                   f"{fmt(r.massive_ratio_before)} → {fmt(r.massive_ratio_after)}, sink rate ×{fmt(r.sink_rate_kept)}, "
                   f"ColSum concentration ×{fmt(r.colsum_concentration_kept)}, KL {fmt(r.mean_kl)} nats; kept "
                   f"fraction of the stages {fmt(kept_fraction(r))}; one model; " + NO_ABLATION_THRESHOLD,
                   str(r.model), effect=kept_fraction(r))


def looped_rows(m: Measurements) -> pd.DataFrame | None:
    t = m.get("retrofit_extrapolate")
    if t is None or t.empty:
        return None
    rows = t[t["looped"].astype(bool)].sort_values("recurrences")
    return rows if len(rows) >= 2 else None


def trained_row(rows: pd.DataFrame) -> tuple[int, pd.Series | None]:
    """(the model's training R, its row in the R grid, or None when the grid lacks it)."""
    trained = int(rows["trained_recurrences"].iloc[0])
    at = rows[rows["recurrences"] == trained]
    return trained, (None if at.empty else at.iloc[0])


def rule_loop_used(m: Measurements, th: Thresholds) -> Verdict:
    rows = looped_rows(m)
    if rows is None:
        return Verdict(NOT_MEASURABLE, "no extrapolation table for the looped model")
    trained, r = trained_row(rows)
    if r is None:
        return Verdict(NOT_MEASURABLE, f"the training R = {trained} is not in the R grid")
    verdict = side(r.loss_minus_r1_lo, r.loss_minus_r1_hi, -th.loop_gain, above_holds=False)
    return Verdict(verdict, f"held-out loss at the training R = {trained} minus at R = 1: "
                   f"{ci(r.loss_minus_r1, r.loss_minus_r1_lo, r.loss_minus_r1_hi)} nats (paired bootstrap over "
                   f"{int(r.texts)} texts; holds below −{fmt(th.loop_gain)})", str(r.model),
                   r.loss_minus_r1, r.loss_minus_r1_lo, r.loss_minus_r1_hi)


def rule_extrapolation(m: Measurements, th: Thresholds) -> Verdict:
    rows = looped_rows(m)
    if rows is None:
        return Verdict(NOT_MEASURABLE, "no extrapolation table for the looped model")
    trained, r = trained_row(rows)
    far = rows.iloc[-1]
    if r is None or far.recurrences < 8 * trained:
        return Verdict(NOT_MEASURABLE, f"the R grid must hold the training R = {trained} and reach 8× it")
    verdict = side(far.loss_minus_trained_lo, far.loss_minus_trained_hi, th.loss_drift, above_holds=False)
    return Verdict(verdict, f"held-out loss R = {trained}: {ci(r.loss, r.loss_lo, r.loss_hi)}, R = "
                   f"{int(far.recurrences)}: {ci(far.loss, far.loss_lo, far.loss_hi)} nats, rise "
                   f"{ci(far.loss_minus_trained, far.loss_minus_trained_lo, far.loss_minus_trained_hi)} (paired over "
                   f"texts; holds when its interval is below {fmt(th.loss_drift)}); {TASK_TEXT} accuracy "
                   f"R = {trained}: "
                   f"{ci(r.accuracy, r.accuracy_lo, r.accuracy_hi)}, R = {int(far.recurrences)}: "
                   f"{ci(far.accuracy, far.accuracy_lo, far.accuracy_hi)}, chance {fmt(far.chance)}", str(r.model),
                   far.loss_minus_trained, far.loss_minus_trained_lo, far.loss_minus_trained_hi)


TASK_TEXT = "one-digit chain_sum"
SOURCE = "§4 item 3, §5 items 2 and 4, §6.2; McLeish et al. 2025"

RETROFIT_CLAIMS: list[Claim] = [
    Claim("retrofit-loop-used", "issue target (McLeish et al. 2025)", "The healed retrofit uses its loop: loss at "
          "the training recurrence is below its own loss at R = 1.", rule_loop_used,
          figure='"A real pretrained looped model" section: retrofit_extrapolation figure, '
                 'retrofit_extrapolate_table'),
    Claim("retrofit-fixed-points", "§4 item 3, Fig. 4", "A retrofitted model (healed SmolLM2) reaches distinct "
          "per-layer fixed points at R = 128.", rule_fixed_points,
          figure='"A real pretrained looped model" section: retrofit_summary; models/smollm2-looped'),
    Claim("retrofit-attention", "§4 items 1–2", "In the retrofitted model attention stabilises: each layer's "
          "pattern matches itself across recurrences.", rule_attention,
          figure='models/smollm2-looped: attention_distance'),
    Claim("retrofit-stages", "§5 item 2, Fig. 40", "A retrofitted model follows its base model's stages on every "
          "recurrence.", rule_stages, figure='"A real pretrained looped model" section: retrofit_alignment'),
    Claim("retrofit-massive-causal", "§5 item 4, Fig. 41", "In the retrofitted looped model, zeroing the MLP that "
          "creates massive activations removes the stages.", rule_massive_causal,
          figure='"A real pretrained looped model" section: retrofit_ablation'),
    Claim("retrofit-extrapolation", "§6.2", "The retrofitted model keeps its loss and task accuracy at ≥ 8× its "
          "training recurrences.", rule_extrapolation,
          figure='"A real pretrained looped model" section: retrofit_extrapolation figure'),
]
