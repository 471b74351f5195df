"""Early-exit section: recurrences run against loss and agreement, per model and rule (`loopscope exit`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv

MARKERS = {"Huginn KL": ("*", 13), "certified margin": ("s", 8), "certified logit": ("^", 8)}  # by rule prefix


SOURCE_EDGES = {"certificate": "tab:olive", "measured": "tab:purple", "max": "k"}  # certified rows: ρ source


def exit_figure(summary: pd.DataFrame, out_dir, name: str, r_max: int):
    """Two panels (loss change, agreement with R_max) against mean recurrences run: fixed R as a line per model (its
    colour), Huginn's rule as a star, certified rules as squares (margin) and triangles (logit ε), edged by the ρ
    source. One legend for colours and one for shapes, outside the panels."""
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    colours = plt.get_cmap("tab10")
    models = list(dict.fromkeys(summary["model"]))
    for m, model in enumerate(models):
        part = summary[summary.model == model]
        fixed = part[part.rule == "fixed R"].sort_values("recurrences_mean")
        for ax, column in zip(axes, ("loss_change", "agreement")):
            ax.plot(fixed["recurrences_mean"], fixed[column], "-o", ms=3, color=colours(m))
            for rule, rows in part[part.rule != "fixed R"].groupby("rule", sort=False):
                marker, size = next(v for k, v in MARKERS.items() if rule.startswith(k))
                source = rule.split("(")[-1].split(" ")[0] if "(" in rule else "max"
                ax.scatter(rows["recurrences_mean"], rows[column], marker=marker, s=size ** 2, color=colours(m),
                           edgecolor=SOURCE_EDGES.get(source, "k"), linewidth=1.4, zorder=3, alpha=0.85)
    for ax, label in zip(axes, (f"loss − loss at R_max = {r_max} (nats)", f"top-1 agreement with R_max = {r_max}")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean recurrences run per position")
        ax.set_ylabel(label)
        ax.axvline(r_max, color="0.5", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    handles = [Line2D([], [], color=colours(m), marker="o", ms=4, label=f"{model} (fixed R line)")
               for m, model in enumerate(models)]
    handles += [Line2D([], [], ls="", marker=marker, ms=size * 0.8, color="0.8", markeredgecolor="k", label=rule)
                for rule, (marker, size) in MARKERS.items()]
    handles += [Line2D([], [], ls="", marker="s", ms=7, color="0.8", markeredgecolor=c, markeredgewidth=1.6,
                       label=f"edge: {src} ρ") for src, c in SOURCE_EDGES.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.79, 1))
    return figures.save(fig, out_dir, name)


def add_exit_section(report: Report, tables: dict[str, pd.DataFrame], r_max: int) -> None:
    out = report.out_dir
    sec = report.section(
        "Early exit: compute against quality",
        f"Every position's next-token prediction read after the recurrence a rule picks (the prefix recurs "
        f"together), against R_max = {r_max}. Fixed R; Huginn's rule (KL between successive next-token "
        "distributions < 5e-4, Geiping et al. 2025); the certified exit: for a contraction with rate ρ, "
        "‖s_t − s*‖ ≤ ρ/(1 − ρ)·‖s_t − s_{t−1}‖, pushed through the exit path by the norm σ_t of its Jacobian "
        f"(first order), stopping when that logit bound is below ε or when √2 times it is below the top-1 margin. "
        "ρ sources: certificate (the spectral radius of the prefix's Jacobian at the long-run state: an asymptotic "
        "rate, not a Lipschitz bound along the way), measured (the largest step ratio of the last 4 recurrences), "
        "max (the larger: the conservative choice). Where ρ ≥ 1 nothing is certified and the position runs all "
        "R_max recurrences.",
    )
    summary = tables["summary"]
    csv = save_csv(summary, out, "exit_summary")
    save_csv(tables["positions"], out, "exit_positions")
    save_csv(tables["prompts"], out, "exit_prompts")
    png = exit_figure(summary, out, "exit_compute_quality", r_max)
    sec.items.append(Figure(png, "Loss change (left, symlog) and agreement with the R_max answer (right) against "
                                 "the mean recurrences run: fixed R as lines, Huginn's rule as stars, the certified "
                                 "margin rule as squares, certified logit bounds as triangles.", [csv]))
    report.table(sec, tables["contraction"], "exit_contraction",
                 "Per model: the largest certificate ρ and measured step rate over prompts, whether the exit may "
                 "certify, and the bound checked against the run itself: over (recurrence, prefix) pairs of the first "
                 "half of the run with a finite bound, the share where ‖s_t − s_{R_max}‖ exceeded "
                 "ρ/(1 − ρ)·‖s_t − s_{t−1}‖ (bound_violated_SOURCE; the last state stands in for s*).")
    report.table(sec, summary, "exit_table",
                 "One row per (model, rule, parameter): mean recurrences run, share saved, loss and accuracy "
                 "(top-1 = next token) and their change against R_max, agreement with the R_max answer, share of "
                 "positions stopped early, and how many of those changed their answer (changed_early).",
                 max_rows=80)
