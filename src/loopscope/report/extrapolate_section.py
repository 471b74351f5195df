"""Extrapolation section: every per-R metric against test-time recurrences, with the training R marked
(Blayney et al. §6.2, Figs. 11/12 and 47–52, plus the accuracy they cite but do not measure)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv

BEHAVIOURS = ("fixed_point", "orbit", "slider", "divergent", "unknown", "at_floor")
PANELS = [  # column, axis label, log y
    ("loss", "held-out loss (nats/token)", False),
    ("accuracy", "GSM8K exact match", False),
    ("fixed_point_distance", "‖X_R − X_Rmax‖ / ‖X_Rmax‖ (last block layer)", True),
    ("successive_change", "‖X_R − X_{R−1}‖ / ‖X_{R−1}‖ (last block layer)", True),
    ("converged", "fraction of tokens at a fixed point (incl. at floor)", False),
    ("alignment_corr", "stage alignment with control (mean Pearson)", False),
]


def add_extrapolate_section(report: Report, tables: dict[str, pd.DataFrame]) -> None:
    """Add the extrapolation figures and tables to `report` (tables as returned by `run_extrapolate`)."""
    per_r = tables["per_r"]
    out = report.out_dir
    sec = report.section(
        "Extrapolation to unseen recurrence counts",
        "Each trained looped model run at R = 1 … ≥ 8× its training recurrences (dotted vertical line). Loss is the "
        "mean next-token cross-entropy on the fixed GSM8K test subset; accuracy is greedy-decoded exact match; the "
        "fixed-point distance compares the last block layer's state after R recurrences with the state at the "
        "largest R; behaviours use the dynamics classifier on the first R recurrences (needs R ≥ 4); alignment is "
        "the mean Pearson correlation, over stage metrics, of the last pass's depth profile with the feedforward "
        "control's (Blayney et al. §6.2).",
    )
    csv = save_csv(per_r, out, "extrapolate_per_r")
    for unit in ("per_text", "per_prompt"):  # the units of the claims' intervals
        if tables.get(unit) is not None:
            save_csv(tables[unit], out, f"extrapolate_{unit}")
    panels = [p for p in PANELS if p[0] in per_r and per_r[p[0]].notna().any()]
    png = metric_panels(per_r, panels, out, "extrapolate_metrics")
    sec.items.append(Figure(png, "Every per-R metric against test-time recurrences R (log x axis), one line per "
                                 "model; the dotted line marks the training R. Log-scale panels omit zeros: the "
                                 "distance at the largest R is 0 by definition; successive change starts at R = 2.",
                            [csv]))
    beh = [b for b in BEHAVIOURS if b in per_r]
    if per_r[beh].notna().any().any():
        png = metric_panels(per_r, [(b, f"fraction {b.replace('_', ' ')}", False) for b in beh], out,
                            "extrapolate_behaviours")
        sec.items.append(Figure(png, "Fraction of real tokens per behaviour (dynamics classifier, last block layer, "
                                     "first R recurrences) against R.", [csv]))
    report.table(sec, per_r.drop(columns=[c for c in ("spec",) if c in per_r]), "extrapolate_table",
                 "One row per (model, R); timings in seconds (of the run that computed the row).", max_rows=80)
    aligned = tables.get("alignment")
    if aligned is not None and not aligned.empty:
        report.table(sec, tables["alignment_last_pass"], "extrapolate_alignment_last_pass",
                     "Pearson correlation of the last pass's profile with the control, per stage metric and R.",
                     max_rows=80)
        save_csv(aligned, out, "extrapolate_alignment_all_passes")


def metric_panels(per_r: pd.DataFrame, panels: list[tuple[str, str, bool]], out, name: str):
    """A grid of panels, one per metric, x = R (log2), one line per model, vertical line at its training R."""
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    models = list(dict.fromkeys(per_r["model"]))
    colours = plt.get_cmap("tab10")
    for i, (column, label, logy) in enumerate(panels):
        ax = axes[i // cols, i % cols]
        for m, model in enumerate(models):
            part = per_r[per_r.model == model].sort_values("recurrences")
            ax.plot(part["recurrences"], part[column], marker="o", ms=4, color=colours(m), label=model)
            ax.axvline(int(part["trained_recurrences"].iloc[0]), color=colours(m), ls=":", lw=1.3,
                       label=f"{model}: training R")
        ax.set_xscale("log", base=2)
        ticks = sorted(per_r["recurrences"].unique())
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        if logy and (per_r[column] > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("test-time recurrences R")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(panels), rows * cols):
        axes[j // cols, j % cols].axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return figures.save(fig, out, name)
