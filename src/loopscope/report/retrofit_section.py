"""Retrofit section: the healed looped SmolLM2 against SmolLM2 (what `experiments.retrofit_study` measured).
Draws and writes only."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv


def add_retrofit_section(report: Report, measured: dict[str, pd.DataFrame], tables: dict[str, dict]) -> None:
    """`measured`: `retrofit_study.retrofit_measurements`; `tables`: the stages' tables (for the per-R rows)."""
    out = report.out_dir
    sec = report.section(
        "A real pretrained looped model: the healed SmolLM2 retrofit",
        "smollm2-looped is SmolLM2-135M-Instruct retrofitted into prelude 0-11, a looped core of layers 12-15 and "
        "coda 20-29 (layers 16-19 dropped, so the loop must recover their depth), healed with a low-rank update "
        "(models/assets/smollm2-looped/README.md). Its dynamics at the paper's R = 128, stages per recurrence "
        "against SmolLM2's own depth profile, the Fig. 41 ablation, and loss and task accuracy against R. "
        "Intervals are 95 % bootstrap intervals (over prompts, texts or questions as stated).",
    )
    report.table(sec, measured["retrofit"], "retrofit_summary", "Fixed points at R = 128 (fractions of tokens, with "
                 "intervals over prompts), stage alignment with SmolLM2 (median over passes), "
                 "stage repetition, attention stabilisation and the largest peak/median |x|.", max_rows=5)
    per_r = measured["retrofit_extrapolate"]
    csv = save_csv(per_r, out, "retrofit_extrapolate")
    sec.items.append(Figure(extrapolation_figure(per_r, out), "Held-out loss (the healing's 8 held-out GSM8K texts; "
                            "95 % interval over texts) and one-digit chain_sum accuracy (four-shot, greedy, exact "
                            "match; interval over questions) against test-time recurrences R of the looped model "
                            "(dotted: its training R); SmolLM2 as shipped (one pass) as a horizontal line, chance "
                            "(majority answer) dashed.", [csv]))
    report.table(sec, per_r, "retrofit_extrapolate_table", "Per (model, R): loss, its difference from R = 1 "
                 "(paired over texts), accuracy, chance.", max_rows=40)
    report.table(sec, measured["retrofit_ablation"], "retrofit_ablation", "The massive-activation ablation on the "
                 "looped model (zero the onset MLP at every pass): the stage metrics' mean after / before.", max_rows=5)
    for name, caption in (("retrofit_alignment_by_prompt", "The stage row's units: per prompt and pass, the Pearson r "
                           "of the pass's ColSum profile with SmolLM2's depth profile of the same prompt."),
                          ("retrofit_attention_by_prompt", "The attention row's units: per prompt, the share of its "
                           "(recurrence, layer) patterns whose nearest pattern from another recurrence is in the "
                           "same layer.")):
        if name in measured:
            report.table(sec, measured[name], name, caption, max_rows=40)
    align = tables["analysis"].get("alignment")
    if align is not None and not align.empty:
        report.table(sec, align, "retrofit_alignment", "Alignment of each pass's stage profile with SmolLM2's depth "
                     "profile, per metric and pass.", max_rows=200)


def extrapolation_figure(per_r: pd.DataFrame, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    looped = per_r[per_r["model"] != "smollm2"].sort_values("recurrences")
    base = per_r[per_r["model"] == "smollm2"]
    for ax, (col, label) in zip(axes, (("loss", "held-out loss (nats/token)"), ("accuracy", "chain_sum accuracy"))):
        x = looped["recurrences"]
        ax.fill_between(x, looped[f"{col}_lo"], looped[f"{col}_hi"], color="C0", alpha=0.2, lw=0)
        ax.plot(x, looped[col], marker="o", color="C0", label="smollm2-looped")
        if len(base):
            ax.axhline(float(base[col].iloc[0]), color="C1", lw=1.2, label="SmolLM2 (one pass)")
        if col == "accuracy" and looped["chance"].notna().any():
            ax.axhline(float(looped["chance"].iloc[0]), color="0.5", ls="--", lw=1, label="chance (majority answer)")
        ax.axvline(int(looped["trained_recurrences"].iloc[0]), color="C0", ls=":", lw=1.2, label="training R")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x), [str(int(t)) for t in x], fontsize=8)
        ax.set_xlabel("recurrences R")
        ax.set_ylabel(label)
        if col == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figures.save(fig, out, "retrofit_extrapolation")
