"""Intervention sections of a report: what changed and its headline numbers; the KL to the unchanged model."""

from __future__ import annotations

import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, Table, save_csv


def add_intervention_section(report: Report, *, what: str, kl_summary: pd.DataFrame, profiles: pd.DataFrame,
                             alignment: pd.DataFrame, massive: dict | None,
                             massive_profile: pd.DataFrame) -> None:
    """Summary tables: KL, stage-profile ranges before/after, alignment summaries, massive-activation profile."""
    intro = f"Intervention: {what}."
    if massive is not None:
        where = f"{massive['segment']} layer {massive['layer']}"
        if massive["segment"] == "core":
            where += f" (first reached at recurrence {massive['recurrence']}; zeroed at every recurrence)"
        verdict = (f"the model has massive activations (largest peak / median |x| = {massive['max_ratio']:.0f} ≥ 100)"
                   if massive["massive"] else
                   f"the model has NO massive activations (largest peak / median |x| = {massive['max_ratio']:.1f} "
                   "< 100); the ablation zeroes the onset layer's MLP anyway, as a control")
        intro += (f" Massive-activation ablation (Blayney et al. 2026 §5, Fig. 41): the onset layer — the earliest "
                  f"state whose peak |activation| reaches half the largest peak — is {where}; {verdict}.")
    sec = report.section("Intervention and its effect", intro)
    report.table(sec, kl_summary, "kl_summary", "KL(p_before ‖ p_after) of the next-token distribution over every "
                 "real token (nats), top-1 agreement and mean entropies (bits) — Lad et al. 2024.")
    report.table(sec, profiles, "profile_summary", "Every stage metric over all states, before and after: a stage "
                 "profile that vanishes shows as a much smaller range (max − min).", max_rows=40)
    if len(alignment):
        report.table(sec, alignment, "alignment_summary", "Alignment averaged over recurrences, per metric: after "
                     "vs before (1 = the stage profile is unchanged) and, with --feedforward, each run vs the "
                     "feedforward model.", max_rows=60)
    report.table(sec, massive_profile, "massive_profile", "Massive activations per state (Sun et al. 2024): peak "
                 "= mean over prompts of max |x|, ratio = peak / median |x|, growth = peak / previous state's peak; "
                 "onset marks the state the onset rule picks.", max_rows=60)


def add_kl_section(report: Report, kl: pd.DataFrame) -> None:
    """Per-token KL to the unchanged model: a figure (one line per prompt) and the whole table."""
    out = report.out_dir
    sec = report.section("KL of the output distribution to the unchanged model",
                         "Per real token: KL(p_before ‖ p_after) in nats (Lad et al. 2024, layer deletion and swap).")
    csv = save_csv(kl, out, "kl_per_token")
    png = figures.line_panels(kl, "token", [("kl", "KL(p_before ‖ p_after) (nats)")], "batch", out, "kl_per_token",
                              title="KL to the unchanged model, per token position", logy=(True,),
                              series_label="prompt")
    sec.items.append(Figure(png, "KL of each token's next-token distribution to the unchanged model's, one line per "
                                 "prompt (symlog axis when some KL are 0).", [csv]))
    sec.items.append(Table(kl, "Per-token KL, entropies and top-1 tokens before and after.", csv, max_rows=40))


def add_ablation_section(report: Report, summary: pd.DataFrame, states: dict[str, pd.DataFrame]) -> None:
    """The massive-activation ablation of several models: one summary row each, and per model a figure of the
    peak/median |x|, sink rate and ColSum concentration along realized depth, before (unchanged) and after."""
    out = report.out_dir
    sec = report.section(
        "Massive-activation ablation (§5 item 4, Fig. 41)",
        "In each model, the MLP of the layer whose output first carries the massive activations (the onset rule "
        "of loopscope.stages.massive) is zeroed at every recurrence, and the prompts are captured again. "
        "kept = mean after / mean before over all states: near 1 the attention stages survive, near 0 the sinks "
        "and the concentration they drive are gone. A model whose largest peak/median |x| is below 100 has no "
        "massive activations to remove; its row is a control.")
    csv = save_csv(summary, out, "massive_ablation_summary")
    sec.items.append(Table(summary, "One row per ablated model: the zeroed layer, peak/median |x| before and after, "
                                    "sink rate and ColSum concentration (mean and range over states) before and "
                                    "after, and the KL of the next-token distribution to the unchanged model.",
                           csv, max_rows=10))
    panels = [("massive_ratio", "peak / median |x|"), ("sink_rate_mean", "sink rate (τ = 0.3)"),
              ("colsum_concentration_mean", "ColSum concentration")]
    for name, frame in states.items():
        stem = f"massive_ablation_{name}".replace("+", "_")
        data = save_csv(frame, out, stem)
        png = figures.line_panels(frame, "depth", panels, "run", out, stem,
                                  title=f"{name}: massive-activation MLP zeroed", logy=(True, False, False),
                                  series_label="run")
        sec.items.append(Figure(png, f"{name}: along realized depth, before (unchanged) and after zeroing the onset "
                                     "layer's MLP.", [data]))
