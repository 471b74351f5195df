"""Lens section: the logit, Jacobian and affine lenses per (recurrence, layer), against the model's final distribution
(`experiments.jacobian_lens` builds every number; this draws them)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv

METRIC_LABELS = {"top1_agreement": "top-1 agreement with the final prediction",
                 "kl_to_final": "KL(final ‖ lens) (nats)", "final_top1_rank": "rank of the final top-1 token"}
LENS_STYLE = {"logit": ("tab:blue", "-"), "jacobian": ("tab:red", "-"), "affine": ("tab:green", "--")}


def lens_heatmaps(views: dict[str, pd.DataFrame], out_dir, name: str):
    """Rows: metric; columns: lens; each panel the block's recurrence × layer matrix."""
    metrics = list(dict.fromkeys(k.split("|")[0] for k in views))
    lenses = list(dict.fromkeys(k.split("|")[1] for k in views))
    fig, axes = plt.subplots(len(metrics), len(lenses), figsize=(3.6 * len(lenses), 2.9 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for j, lens in enumerate(lenses):
            ax = axes[i, j]
            matrix = views.get(f"{metric}|{lens}")
            if matrix is None:
                ax.axis("off")
                continue
            kw = dict(vmin=0, vmax=1, cmap="viridis") if metric == "top1_agreement" else dict(cmap="magma_r")
            im = ax.imshow(matrix.to_numpy(dtype=float), aspect="auto", interpolation="nearest", origin="lower",
                           **kw)
            fig.colorbar(im, ax=ax)
            ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], fontsize=7)
            ax.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index], fontsize=7)
            ax.set_xlabel("block layer", fontsize=8)
            ax.set_ylabel("recurrence", fontsize=8)
            ax.set_title(f"{lens} lens: {METRIC_LABELS.get(metric, metric)}", fontsize=8)
    fig.tight_layout()
    return figures.save(fig, out_dir, name)


def lens_depth_lines(summary: pd.DataFrame, out_dir, name: str):
    """One panel per metric along realized depth (every state), one line per lens; dotted lines at recurrence
    boundaries are not drawn — block states are the marked points."""
    metrics = [m for m in METRIC_LABELS if f"{m}_mean" in summary]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for lens, part in summary.groupby("lens", sort=False):
            colour, ls = LENS_STYLE.get(lens, ("0.3", "-"))
            part = part.sort_values("depth")
            ax.plot(part["depth"], part[f"{metric}_mean"], ls=ls, color=colour, marker=".", ms=4, lw=1.2,
                    label=f"{lens} lens")
        ax.set_xlabel("realized depth")
        ax.set_ylabel(METRIC_LABELS[metric], fontsize=8)
        if metric != "top1_agreement":
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return figures.save(fig, out_dir, name)


def add_lens_section(report: Report, summary: pd.DataFrame, views: dict[str, pd.DataFrame], closing: pd.DataFrame,
                     info: dict, model_name: str, prefix: str = "") -> None:
    out = report.out_dir
    sec = report.section(
        f"Lenses per recurrence and layer — {model_name}",
        "Every state read as a next-token distribution three ways and compared with the model's own final "
        "distribution: the logit lens W_U·n_f(h); the Jacobian lens W_U·n_f(J h) with J = E[(1/|V|) Σ_t Σ_t' "
        "∂h_final,t'/∂h_t] fitted per (segment, recurrence, layer) from vector-Jacobian products (Gurnee et al. "
        "2026); and an affine lens W_U·n_f(A h + b) fitted per state by least squares to h_final (a closed-form "
        "stand-in for the tuned lens, Belrose et al. 2023). Both maps are fitted on the first half of the lens "
        f"prompts and read on the other half ({info}).",
    )
    csv = save_csv(summary, out, f"{prefix}lens_comparison")
    png = lens_heatmaps(views, out, f"{prefix}lens_heatmaps")
    sec.items.append(Figure(png, "Block states: rows top-1 agreement with the final prediction, KL to the final "
                                 "distribution, rank of the final token; columns the logit, Jacobian and affine "
                                 "lenses; each panel recurrence (up) × block layer.", [csv]))
    png = lens_depth_lines(summary, out, f"{prefix}lens_depth")
    sec.items.append(Figure(png, "The same along realized depth, every state (prelude, each recurrence's block "
                                 "layers, coda), one line per lens.", [csv]))
    from loopscope.report.stages_section import three_views

    for lens in dict.fromkeys(summary["lens"]):  # the stage figures' three views, one per lens, of top-1 agreement
        table = summary[summary.lens == lens]
        png, views_csv = three_views(table, "top1_agreement_mean", f"{lens} lens: top-1 agreement with final", out,
                                     f"{prefix}lens_{lens}_top1_agreement", None, "")
        csv_views = save_csv(views_csv, out, f"{prefix}lens_{lens}_top1_agreement_views")
        sec.items.append(Figure(png, f"{lens} lens, top-1 agreement with the final prediction: realized depth · by "
                                     "recurrence · by block layer across recurrences.", [csv_views]))
    if closing is not None and len(closing):
        report.table(sec, closing, f"{prefix}lens_closing",
                     "Each lens at the last block layer of the first, middle and last recurrence.")
