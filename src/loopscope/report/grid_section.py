"""Architecture-grid section: the paper's Fig. 6 / 29–31 layout from the grid tables."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv


def add_grid_section(report: Report, cells: pd.DataFrame, change_curves: pd.DataFrame, min_cosine: pd.DataFrame,
                     verdicts: pd.DataFrame, certificates: pd.DataFrame | None = None,
                     certificate_agreement: pd.DataFrame | None = None,
                     *, same_point_cosine: float, shown_setting: tuple[int, float] | None = None) -> None:
    """Draws `experiments.grid.grid_views`: the verdicts, the change curves (mean over seeds), the min-cosine matrix,
    every cell, and the certificates."""
    out = report.out_dir
    sec = report.section(
        "Architecture grid at random initialisation",
        "Blayney et al. §4.2 (Fig. 6, Figs. 29–31): blocks of 4/12/16 layers without prelude or coda, three norm "
        "placements with and without concat input injection, several seeds. A cell is 'stable' when most tokens "
        "reach a fixed point (last layer's relative change at the last recurrence below tolerance), 'degenerate' "
        f"when all layers share it (min cosine between layer 0's fixed point and the others ≥ {same_point_cosine:g}). "
        "The paper "
        "publishes neither its width D nor the scale of the injected signal, so both are axes here: one verdict "
        "row per (norm, injection, D, injected RMS); `default` marks the setting fixed before any run (D = 64, "
        "Huginn's initialisation rule, RMS 0.632).",
    )
    report.table(sec, verdicts, "grid_verdicts", "Measured verdict (majority over block sizes and seeds) beside the "
                 "paper's, per norm, injection and (width, injected RMS) setting.", max_rows=80)
    at = "" if shown_setting is None else f" (D = {shown_setting[0]}, injected RMS {shown_setting[1]:g})"
    norms = list(dict.fromkeys(cells["norm"]))
    injections = list(dict.fromkeys(cells["injection"]))
    mean = change_curves
    csv = save_csv(mean, out, "grid_change_curves")
    for column, label, name in (("l2_mean", "‖X_t − X_{t−1}‖ (last block layer)", "grid_change"),
                                ("cosine_mean", "cos(X_t, X_{t−1}) (last block layer)", "grid_cosine")):
        fig, axes = plt.subplots(len(injections), len(norms), figsize=(4.2 * len(norms), 3.2 * len(injections)),
                                 squeeze=False, sharex=True)
        blocks = sorted(mean["block_size"].unique())
        colours = figures.series_colours(len(blocks), figures.BY_LAYER)
        for i, inj in enumerate(injections):
            for j, norm in enumerate(norms):
                ax = axes[i, j]
                for k, colour in zip(blocks, colours):
                    part = mean[(mean.norm == norm) & (mean.injection == inj) & (mean.block_size == k)]
                    ax.plot(part["recurrence"], part[column], color=colour, label=f"k={k}")
                if column == "l2_mean":
                    ax.set_yscale("log")
                ax.set_title(f"{norm} norm, injection {inj}", fontsize=9)
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
                if i == len(injections) - 1:
                    ax.set_xlabel("recurrence")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        png = figures.save(fig, out, name)
        sec.items.append(Figure(png, f"{label} against recurrence{at}, mean over seeds and tokens, one line per block "
                                     "size (the paper's Figs. 29/30).", [csv]))
    pivot = min_cosine
    csv = save_csv(pivot, out, "grid_min_cosine")
    png = figures.matrix_plot(pivot, out, "grid_min_cosine", title="Min cosine between layer 0's fixed point and any "
                              "other layer's (1 = degenerate)", cbar="cosine", fmt="{:.3f}")
    sec.items.append(Figure(png, "The paper's degeneracy test (Fig. 6, right) per norm/injection (and setting) and "
                                 "block size, mean over seeds.", [csv]))
    report.table(sec, cells, "grid_cells", "Every cell: convergence, degeneracy and behaviour fractions.", max_rows=60)
    if certificates is not None and not certificates.empty:
        add_grid_certificates(report, sec, certificates, certificate_agreement)


def add_grid_certificates(report: Report, sec, cert: pd.DataFrame, agreement: pd.DataFrame) -> None:
    """Per cell's certified tokens: the predicted behaviour against the detector's label, and ρ against the
    observed step-size rate."""
    out = report.out_dir
    csv = save_csv(cert, out, "grid_certificates")
    report.table(sec, agreement, "grid_certificate_agreement", "Stability certificate over every grid "
                 "cell's certified tokens: the behaviour the leading Jacobian eigenvalue predicts (rows) against "
                 "the dynamics detector's label (columns); 'agree' is the fraction the prediction admits.")
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    groups = cert.groupby(["norm", "injection"], sort=False)  # one colour per norm/injection: drawing, not computing
    colours = plt.get_cmap("tab10")
    for i, ((norm, inj), part) in enumerate(groups):
        floor = part["at_floor"].astype(bool) if "at_floor" in part else pd.Series(False, index=part.index)
        ax.scatter(part["rho"][~floor], part["step_rate"][~floor], s=14, color=colours(i % 10),
                   label=f"{norm}/{inj}", alpha=0.8)
        ax.scatter(part["rho"][floor], part["step_rate"][floor], s=14, facecolors="none",
                   edgecolors=colours(i % 10), alpha=0.8)
    finite = cert[["rho", "step_rate"]].replace([float("inf"), -float("inf")], float("nan")).dropna()
    if len(finite):
        lo, hi = float(finite.min().min()), float(finite.max().max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="observed = predicted")
    ax.axvline(1.0, color="0.3", lw=0.6, ls=":")
    ax.set_xlabel("certificate: ρ = |λ₁| of the block map's Jacobian at s_R")
    ax.set_ylabel("observed step-size rate (last recurrences)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = figures.save(fig, out, "grid_certificate_rate")
    sec.items.append(Figure(png, "Predicted contraction rate ρ against the observed decay of the successive change "
                                 "per certified token, coloured by norm/injection (hollow: the token's steps are at "
                                 "the rounding floor, so the measured rate is the floor's): a stable fixed point "
                                 "needs ρ < 1, and there the two should agree.", [csv]))
