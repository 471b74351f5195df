"""Stages-of-inference section: three views of every metric (Blayney et al. §3.6), feedforward overlay, alignment."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from loopscope import stages
from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv


def draw_baseline(axes, baseline: pd.DataFrame, value: str, name: str) -> pd.DataFrame:
    """The same three views of `baseline` (e.g. the model before an intervention), thin grey dashed lines."""
    views = {"realized_depth": stages.by_realized_depth(baseline, value),
             "by_recurrence": stages.by_recurrence(baseline, value), "by_layer": stages.by_layer(baseline, value)}
    style = dict(color="0.55", ls="--", lw=1.0, zorder=1)
    for ax, (view, frame), series in zip(axes, views.items(), (None, "recurrence", "layer")):
        groups = [(None, frame)] if series is None else list(frame.groupby(series))
        for n, (_, part) in enumerate(groups):
            ax.plot(part["x"], part["y"], **style, label=name if n == 0 else None)
        ax.legend(fontsize=7)
    return pd.concat([v.assign(view=k, run=name) for k, v in views.items()], ignore_index=True)


def three_views(table: pd.DataFrame, value: str, label: str, out_dir, name: str,
                feedforward: pd.DataFrame | None, ff_name: str,
                baseline: pd.DataFrame | None = None, baseline_name: str = "before") -> tuple:
    """Realized depth | by recurrence on relative depth (feedforward dashed) | by layer across recurrences.

    `baseline` (same metric table of another run of the model, e.g. before an intervention) is drawn under
    every panel as thin grey dashed lines, and its views are appended to the returned CSV frame (`run` column).
    """
    depth = stages.by_realized_depth(table, value)
    per_rec = stages.by_recurrence(table, value)
    per_layer = stages.by_layer(table, value)
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    base_views = None
    if baseline is not None and value in baseline and baseline[value].notna().any():
        base_views = draw_baseline(axes, baseline, value, baseline_name)
    ax = axes[0]
    ax.plot(depth["x"], depth["y"], color="0.2", lw=1.2)
    for seg, colour in (("prelude", "tab:blue"), ("coda", "tab:red")):
        part = depth[depth.segment == seg]
        if len(part):  # a model without prelude / coda gets no legend entry for it
            ax.scatter(part["x"], part["y"], color=colour, s=14, zorder=3, label=seg)
    core = depth[depth.segment == "core"]
    ax.scatter(core["x"], core["y"], c=core["recurrence"], cmap=figures.BY_RECURRENCE, s=10, zorder=3)
    ax.set_xlabel("realized depth")
    ax.set_title("along realized depth", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1]
    recs = sorted(per_rec["recurrence"].unique())
    for r, colour in zip(recs, figures.series_colours(len(recs), figures.BY_RECURRENCE)):
        part = per_rec[per_rec.recurrence == r]
        ax.plot(part["x"], part["y"], color=colour, lw=1.2)
    if feedforward is not None and value in feedforward and feedforward[value].notna().any():
        ff = stages.by_recurrence(feedforward, value)
        ax.plot(ff["x"], ff["y"], "k--", lw=1.6, label=ff_name)
        ax.legend(fontsize=7)
    figures.add_colourbar(fig, ax, figures.BY_RECURRENCE, recs, "recurrence")
    ax.set_xlabel("relative depth within prelude + pass + coda (%)")
    ax.set_title("by recurrence", fontsize=9)
    ax = axes[2]
    layers = sorted(per_layer["layer"].unique())
    if per_layer["recurrence"].nunique() > 1:
        for j, colour in zip(layers, figures.series_colours(len(layers), figures.BY_LAYER)):
            part = per_layer[per_layer.layer == j]
            ax.plot(part["x"], part["y"], color=colour, lw=1.2, marker=".", ms=4)
        figures.add_colourbar(fig, ax, figures.BY_LAYER, layers, "block layer")
    else:  # a feedforward model (R = 1): every layer is a single point, nothing to follow
        ax.cla()
        ax.text(0.5, 0.5, "one recurrence (feedforward):\nno layer to follow across recurrences",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
        ax.set_xticks([])
    ax.set_xlabel("recurrence")
    ax.set_title("by block layer, across recurrences", fontsize=9)
    for ax in axes:
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = figures.save(fig, out_dir, name)
    views = pd.concat([depth.assign(view="realized_depth"), per_rec.assign(view="by_recurrence"),
                       per_layer.assign(view="by_layer")], ignore_index=True)
    if base_views is not None:
        views = pd.concat([views.assign(run="shown"), base_views], ignore_index=True)
    return png, views


def add_stages_section(report: Report, table: pd.DataFrame, metrics: dict[str, str], *, model_name: str,
                       feedforward: pd.DataFrame | None = None, ff_name: str = "feedforward",
                       alignment: pd.DataFrame | None = None, prop42: pd.DataFrame | None = None,
                       neurons: pd.DataFrame | None = None, baseline: pd.DataFrame | None = None,
                       baseline_name: str = "before", prefix: str = "", note: str = "") -> None:
    """One section; `prefix` keeps the file names of several sections in one report apart (figures/stage_{prefix}…,
    tables/{prefix}…); `baseline` overlays another run of the same model (grey dashed) on every figure."""
    out = report.out_dir
    sec = report.section(
        f"Stages of inference — {model_name}",
        "Per-state metrics of the stages-of-inference view (Queipo-de-Llano et al. 2025; Lad et al. 2024), each "
        "in three views (Blayney et al. §3.6): along realized depth (prelude blue, coda red, block states coloured "
        "by recurrence), one line per recurrence on relative depth with the feedforward model dashed, and one line "
        "per block layer across recurrences (flat lines: the layer repeats its stage every pass)."
        + (f" Grey dashed lines: {baseline_name}." if baseline is not None else "") + (f" {note}" if note else ""),
    )
    save_csv(table, out, f"{prefix}stages_per_state")
    if feedforward is not None:
        save_csv(feedforward, out, f"{prefix}stages_per_state_feedforward")
    if baseline is not None:
        save_csv(baseline, out, f"{prefix}stages_per_state_baseline")
    for value, label in metrics.items():
        if value not in table or not table[value].notna().any():
            continue
        stem = value.removesuffix("_mean")
        png, views = three_views(table, value, label, out, f"stage_{prefix}{stem}", feedforward, ff_name,
                                 baseline, baseline_name)
        csv = save_csv(views, out, f"stage_{prefix}{stem}_views")
        shown = f"{label}: realized depth · by recurrence · by layer"
        sec.items.append(Figure(png, shown + (f" (grey dashed: {baseline_name})." if baseline is not None else "."),
                                [csv]))
    if alignment is not None and len(alignment):
        report.table(sec, alignment, f"{prefix}alignment",
                     f"Alignment of each recurrence's stage profile with {ff_name} on relative depth (both resampled "
                     "to 50 points): Pearson and Spearman correlation, RMSE, and RMSE over the feedforward profile's "
                     "range (nrmse). 1 / 0 = the same stages.", max_rows=60)
    if prop42 is not None and len(prop42):
        report.table(sec, prop42, f"{prefix}prop42_summary",
                     "Proposition 4.2 checked: measured attention change ‖S(X_t) − S(X_{t−1})‖_F against the bound "
                     "L·(2Bκ/√d)·‖ΔX‖ (L = 1/2, κ = ‖W_Q‖‖W_K‖ before RoPE), per block layer; a ratio above 1 would "
                     "be a bug.")
    if neurons is not None and len(neurons):
        report.table(sec, neurons, f"{prefix}neuron_fractions",
                     "Prediction / suppression neurons per layer (Gurnee et al. 2024): vocabulary-composition kurtosis "
                     "> 10, sign of the skew. Weights are tied across recurrences, so these are per physical layer.",
                     max_rows=40)
