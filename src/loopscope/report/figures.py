"""Figure primitives: each takes tidy DataFrames (already computed) and writes one PNG.

Colour conventions follow Blayney et al. §3.6: one line per *recurrence* uses a green→yellow map (`summer`,
later = yellower); one line per *layer* uses blue→green (`winter`, later = greener).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

BY_RECURRENCE = "summer"
BY_LAYER = "winter"


def save(fig, out_dir: Path, name: str) -> Path:
    """OUT/figures/NAME.png, written whole or not at all (a full disk never leaves a truncated PNG)."""
    import io

    from loopscope.resume import write_atomic

    path = Path(out_dir) / "figures" / f"{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


def series_colours(n: int, cmap: str) -> list:
    colours = plt.get_cmap(cmap)
    return [colours(i / max(n - 1, 1)) for i in range(n)]


def line_panels(
    df: pd.DataFrame,
    x: str,
    panels: list[tuple[str, str]],
    series: str,
    out_dir: Path,
    name: str,
    *,
    title: str,
    cmap: str = BY_LAYER,
    logy: tuple[bool, ...] | None = None,
    series_label: str | None = None,
    overlay: pd.DataFrame | None = None,
    overlay_label: str = "feedforward",
) -> Path:
    """One panel per (column, axis label) in `panels`; one line per value of `series`; ±std band when a
    `<column>_std` column exists. `overlay` (same x and columns, no series) is drawn as a dashed black line."""
    keys = sorted(df[series].dropna().unique())
    numeric = all(isinstance(k, (int, float, np.number)) for k in keys)
    # ordered series (layers, recurrences) on a sequential scale; named ones (models) in distinct colours
    colours = series_colours(len(keys), cmap) if numeric else [plt.get_cmap("tab20")(i % 20) for i in range(len(keys))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for p, (column, label) in enumerate(panels):
        ax = axes[0, p]
        for key, colour in zip(keys, colours):
            part = df[df[series] == key].sort_values(x)
            legend = series if series_label is None else series_label
            ax.plot(part[x], part[column], color=colour, lw=1.4, label=f"{legend} {key}".strip())
            if f"{column}_std" in part:
                lo, hi = part[column] - part[f"{column}_std"], part[column] + part[f"{column}_std"]
                ax.fill_between(part[x], lo, hi, color=colour, alpha=0.12, lw=0)
        if overlay is not None and column in overlay:
            ov = overlay.sort_values(x)
            ax.plot(ov[x], ov[column], "k--", lw=1.6, label=overlay_label)
        if logy and logy[p]:
            ax.set_yscale("symlog", linthresh=1e-6) if (df[column] <= 0).any() else ax.set_yscale("log")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if numeric and len(keys) > 16 and overlay is None:  # many layers or recurrences: a colour scale reads better
        add_colourbar(fig, axes[0, -1], cmap, keys, series_label or series)
    elif numeric:
        step = max(1, len(keys) // 12)
        keep = [i for i in range(len(labels)) if i % step == 0 or labels[i] == overlay_label]
        axes[0, -1].legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=7, loc="best")
    elif len(labels) > 12:  # many named series (models): every name, beside the panels so no curve is hidden
        axes[0, -1].legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                           ncol=2 if len(labels) > 24 else 1)
        fig.set_figwidth(fig.get_figwidth() + 1.8)
    else:  # named series: every name (no scale can stand in for them)
        axes[0, -1].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, name)


def quantile_panels(
    df: pd.DataFrame,
    x: str,
    panels: list[tuple[str, str, float | None]],
    series: str,
    out_dir: Path,
    name: str,
    *,
    title: str,
    cmap: str = BY_LAYER,
    series_label: str | None = None,
    band: tuple[str, str] = ("q25", "q75"),
    outer: tuple[str, str] = ("q10", "q90"),
    floor_label: str = "numerical floor",
) -> Path:
    """One log-axis panel per (stem, axis label, floor) in `panels`: for every value of `series`, the median
    `<stem>_median` with the inter-quartile band and a fainter 10–90 % band over tokens; `floor` (or None) is drawn
    as a dotted horizontal line. Distances are ≥ 0, so nothing is drawn below zero; exact zeros (no change at all)
    are shown at the floor's level or the panel's bottom, never as −∞."""
    keys = sorted(df[series].dropna().unique())
    colours = series_colours(len(keys), cmap)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for p, (stem, label, floor) in enumerate(panels):
        ax = axes[0, p]
        positive = df[[f"{stem}_{q}" for q in ("median", *band, *outer)]].to_numpy(dtype=float)
        positive = positive[np.isfinite(positive) & (positive > 0)]
        bottom = min([v for v in (positive.min() if positive.size else None, floor) if v is not None] or [1e-12])
        bottom = bottom / 3
        for key, colour in zip(keys, colours):
            part = df[df[series] == key].sort_values(x)
            clip = (lambda v: v.clip(lower=bottom))  # noqa: E731 - zeros at the panel's bottom on a log axis
            ax.fill_between(part[x], clip(part[f"{stem}_{outer[0]}"]), clip(part[f"{stem}_{outer[1]}"]),
                            color=colour, alpha=0.07, lw=0)
            ax.fill_between(part[x], clip(part[f"{stem}_{band[0]}"]), clip(part[f"{stem}_{band[1]}"]),
                            color=colour, alpha=0.18, lw=0)
            ax.plot(part[x], clip(part[f"{stem}_median"]), color=colour, lw=1.4,
                    label=f"{series if series_label is None else series_label} {key}".strip())
        if floor is not None:
            ax.axhline(floor, color="0.2", ls=":", lw=1.2, label=floor_label)
        if positive.size:
            ax.set_yscale("log")
        else:  # e.g. every token's state went non-finite: say so rather than draw an empty log axis
            ax.text(0.5, 0.5, "no finite positive value to draw", transform=ax.transAxes, ha="center", va="center",
                    color="0.4")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if len(keys) <= 16:
        axes[0, -1].legend(handles, labels, fontsize=7, loc="best")
    else:
        add_colourbar(fig, axes[0, -1], cmap, keys, series_label or series)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, name)


def sweep_panels(table: pd.DataFrame, out_dir: Path, name: str, *, title: str) -> Path:
    """One panel per (method, threshold) of a threshold sweep: rate vs value with its interval, default marked."""
    groups = list(table.groupby(["method", "threshold"], sort=False))
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, ((method, threshold), part) in zip(axes.flat, groups):
        part = part.sort_values("value")
        ax.fill_between(part["value"], part["ci_low"], part["ci_high"], color="tab:blue", alpha=0.2, lw=0)
        ax.plot(part["value"], part["non_fixed_rate"], color="tab:blue", marker="o", ms=3)
        d = part[part["default"]]
        ax.scatter(d["value"], d["non_fixed_rate"], color="tab:red", zorder=3, s=25, label="default")
        if (part["value"] > 0).all() and part["value"].max() / part["value"].min() > 20:
            ax.set_xscale("log")
        ax.set_title(f"{method}: {threshold}", fontsize=9)
        ax.set_ylim(-0.02, max(0.05, float(part["ci_high"].max()) * 1.1))
        ax.set_ylabel("non-fixed-point rate", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, name)


def scatter_identity(df: pd.DataFrame, x: str, y: str, hue: str, out_dir: Path, name: str, *, title: str,
                     xlabel: str, ylabel: str) -> Path:
    """y against x, one colour per value of `hue`, with the line y = x."""
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    groups = sorted(df[hue].dropna().unique())
    for key, colour in zip(groups, series_colours(len(groups), "tab10")):
        part = df[df[hue] == key]
        ax.scatter(part[x], part[y], s=18, color=colour, label=str(key), alpha=0.8)
    values = pd.concat([df[x], df[y]]).replace([np.inf, -np.inf], np.nan).dropna()
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", ls="--", lw=1, label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, name)


def add_colourbar(fig, ax, cmap: str, keys, label: str) -> None:
    norm = matplotlib.colors.Normalize(vmin=min(keys), vmax=max(keys))
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    if len(keys) <= 12:  # integer series (layers, recurrences): one tick each
        bar.set_ticks(list(keys))


def heatmap(matrix: pd.DataFrame, out_dir: Path, name: str, *, title: str, cbar: str, cmap: str = "viridis",
            group_level: str | None = "recurrence") -> Path:
    """Square (recurrence, layer) × (recurrence, layer) matrix; thin lines mark recurrence boundaries."""
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(values, cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar)
    if isinstance(matrix.index, pd.MultiIndex) and group_level in matrix.index.names:
        groups = matrix.index.get_level_values(group_level).to_numpy()
        edges = [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]]
        for e in edges:
            ax.axhline(e - 0.5, color="w", lw=0.6)
            ax.axvline(e - 0.5, color="w", lw=0.6)
        starts = [0, *edges]
        ax.set_xticks(starts, [f"t={groups[s]}" for s in starts], rotation=90, fontsize=7)
        ax.set_yticks(starts, [f"t={groups[s]}" for s in starts], fontsize=7)
        ax.set_xlabel("(recurrence, layer) — ticks at each recurrence's first layer")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, name)


def pca_panels(points: pd.DataFrame, explained: pd.DataFrame, out_dir: Path, name: str, *, title: str) -> Path:
    """PC pairs (1,2), (3,4), (5,6) of one token's trajectory; colour dark→bright by realized depth, markers by
    block layer, and the path drawn in realized order so a cycle shows as a closed loop."""
    pairs = [(a, b) for a, b in ((1, 2), (3, 4), (5, 6)) if f"pc{b}" in points]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    order = points.sort_values("depth")
    ratios = dict(zip(explained["component"], explained["explained_variance_ratio"]))
    markers = "os^Dv<>p*h"
    for ax, (a, b) in zip(axes[0], pairs):
        ax.plot(order[f"pc{a}"], order[f"pc{b}"], color="0.75", lw=0.6, zorder=1)
        for layer, part in order.groupby("layer"):
            ax.scatter(part[f"pc{a}"], part[f"pc{b}"], c=part["depth"], cmap="magma", s=16,
                       marker=markers[int(layer) % len(markers)], label=f"layer {layer}", zorder=2,
                       vmin=order["depth"].min(), vmax=order["depth"].max())
        last = order[order["recurrence"] == order["recurrence"].max()]
        ax.plot(last[f"pc{a}"], last[f"pc{b}"], color="red", lw=1.2, zorder=3, label="last recurrence")
        ax.set_xlabel(f"PC{a} ({ratios.get(a, np.nan):.1%})")
        ax.set_ylabel(f"PC{b} ({ratios.get(b, np.nan):.1%})")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, name)


def grouped_bars(table: pd.DataFrame, out_dir: Path, name: str, *, title: str, ylabel: str) -> Path:
    """Bars for a (category × group) table: index = categories on x, one bar per column."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(table.index) + 2), 3.8))
    n = len(table.columns)
    width = 0.8 / max(n, 1)
    xs = np.arange(len(table.index))
    for i, column in enumerate(table.columns):
        bars = ax.bar(xs + (i - (n - 1) / 2) * width, table[column].to_numpy(dtype=float), width, label=str(column))
        ax.bar_label(bars, fmt="%g", fontsize=7)
    ax.set_xticks(xs, [str(i) for i in table.index])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if n > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, out_dir, name)


def matrix_plot(table: pd.DataFrame, out_dir: Path, name: str, *, title: str, cbar: str, fmt: str = "{:g}") -> Path:
    """A small labelled matrix (e.g. behaviour co-occurrence) with its numbers written in the cells."""
    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * values.shape[1] + 2.5, 0.8 * values.shape[0] + 1.8))
    im = ax.imshow(values, cmap="Blues")
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                color="white" if im.norm(v) > 0.5 else "black")  # dark cells of the colour scale, whatever its range
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, name)
