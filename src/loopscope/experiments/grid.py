"""`loopscope grid`: which architectures reach a stable cyclic fixed point at random initialisation?

Blayney et al. (2026) §4.2, Fig. 6 and Figs. 29–31: recurrent blocks of 4, 12 and 16 layers, no prelude or
coda, norm ∈ {pre, sandwich (Huginn), ouro} × input injection ∈ {none, concat}, 3 seeds, 128 recurrences.
Their finding: with injection every norm but Ouro's reaches a stable fixed point; without injection only
pre-norm does, and that fixed point is degenerate (every layer converges to the same point).

Each cell is one randomly initialised `LoopedLM` run on the same token sequences; its verdict comes from
`dynamics.degeneracy_summary` (distinct / degenerate / no fixed point). Each finished cell is written whole, in one
atomic file keyed on the cell and every setting that changes it (OUT/cache/grid/), so an interrupted grid resumes
where it stopped and a rerun with other settings (another R, tolerance, precision) never reuses a cell; the tables
OUT/grid_cells.csv, grid_curves.csv and grid_certificates.csv are written from the cells the run asks for.

Each cell also certifies `certificate_tokens` tokens of its first prompt (`experiments.certificate`: the leading
eigenvalues of the block map's Jacobian at the state after R recurrences) and joins the prediction with the
detector's label and observed step-size rate: OUT/grid_certificates.csv, one row per (cell, token). That is the
paper's open "why": whether injection and norm placement make the block a contraction (ρ < 1) or not.

Two settings the paper does not publish decide some verdicts, so they are axes of the grid: the width D
(`widths`) and the RMS of the injected signal (`injected_rms`: the per-element RMS of the scaled embedding the
block is injected with). The defaults, fixed before any grid was run, are the settings of the first grid: D = 64 and
Huginn's rule (weights N(0, 2/(5D)), embeddings × √D, so RMS √(2/5) ≈ 0.632 at every width) — the one published
initialisation of a looped model of this kind. A normed prelude output (what Huginn actually injects) has RMS 1;
`injected_rms=1.0` gives that. The verdict table has one row per (norm, injection, width, RMS).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from loopscope import dynamics
from loopscope.capture import capture, encode_prompts
from loopscope.data.prompts import load_prompts
from loopscope.data.tokenizer import load_tokenizer
from loopscope.dynamics.degeneracy import SAME_POINT_COSINE
from loopscope.errors import InputError
from loopscope.models import LoopedConfig, LoopedLM
from loopscope.models.device import Precision
from loopscope.resume import cached_json, run_key, write_atomic

# The paper's verdicts (§4.2, §6.1), independent of block size ("qualitatively identical" for 4, 12, 16 layers).
PAPER_VERDICTS = {
    ("pre", "concat"): "stable",
    ("sandwich", "concat"): "stable",
    ("ouro", "concat"): "not stable",
    ("pre", "none"): "stable, degenerate",
    ("sandwich", "none"): "not stable",
    ("ouro", "none"): "not stable",
}
HUGINN_RMS = (2 / 5) ** 0.5  # per-element RMS of Huginn's scaled embedding: σ·√D with σ = √(2/(5D))


def rms_key(rms) -> float:
    """An injected RMS as cells are keyed and stored: 4 decimals (so 0.6325 read back from a CSV is the same cell)."""
    return round(float(rms), 4)


DEFAULT_SETTING = {"d_model": 64, "injected_rms": rms_key(HUGINN_RMS)}  # chosen before any grid ran (module doc)
SETTING_COLUMNS = ["d_model", "injected_rms"]
CELL_COLUMNS = ["norm", "injection", "block_size", "seed", *SETTING_COLUMNS]


@dataclass
class GridSettings:
    out: Path = Path("reports/grid")
    norms: tuple[str, ...] = ("pre", "sandwich", "ouro")
    injections: tuple[str, ...] = ("none", "concat")
    block_sizes: tuple[int, ...] = (4, 12, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    recurrences: int = 128
    widths: tuple[int, ...] = (DEFAULT_SETTING["d_model"],)  # D, an axis (the paper does not publish its width)
    injected_rms: tuple[float, ...] = (DEFAULT_SETTING["injected_rms"],)  # RMS of the injected embedding, an axis
    n_prompts: int = 4
    max_tokens: int = 48  # prompts truncated to this many tokens (dynamics are per token)
    converge_tol: float = 1e-3  # last layer's relative change at the last recurrence below this = converged
    direction_tol: float = 1e-4  # 1 − cos(X_t, X_{t−1}) below this (with a growing norm) = the direction converged
    init_std: float | None = None  # weight std; None = Huginn's rule sqrt(2/(5D)) (the paper's is not published)
    certificate_tokens: int = 4  # tokens of the first prompt certified per cell (0: none)
    progress: bool = True
    curves: dict = field(default_factory=dict)
    precision: Precision = field(default_factory=Precision)
    overwrite: bool = False  # replace what an earlier run with other settings left in `out`


def grid_config(norm: str, injection: str, block: int, seed: int, d_model: int,
                init_std: float | None = None, injected_rms: float = HUGINN_RMS) -> LoopedConfig:
    """A (0, k⊗R, 0) model with Huginn's scales: weights N(0, 2/(5D)), start state TruncNormal(0, 2/5) with
    injection (Huginn's s_0 = σ·√D), the embedding itself without (it must); embeddings scaled so that the
    injected signal has per-element RMS `injected_rms` (embed_scale = injected_rms / σ; Huginn's √D when
    injected_rms = √(2/5) and σ is Huginn's).

    Without a prelude the injected signal is the scaled embedding; unscaled (RMS σ ≈ 0.08 at D = 64, against a
    normalised state of RMS 1) injection would carry almost nothing and every cell would run autonomously.
    """
    if injected_rms <= 0:
        raise InputError(f"--injected-rms {injected_rms}: give a positive RMS (e.g. 0.632 for Huginn's rule, 1.0)")
    std = init_std or (2 / (5 * d_model)) ** 0.5
    # the default's key is rounded to 4 digits; its scale is Huginn's exact √D, so the default cells are the same
    # models as before the RMS was an axis
    scale = d_model ** 0.5 if init_std is None and rms_key(injected_rms) == rms_key(HUGINN_RMS) else injected_rms / std
    return LoopedConfig(
        name=f"{norm}-{injection}-k{block}-s{seed}-d{d_model}-e{injected_rms:g}", vocab_size=1024, d_model=d_model,
        n_heads=4, d_mlp=int(8 * d_model / 3), n_prelude=0, n_block=block, n_coda=0, recurrences=8, norm=norm,
        injection=injection, state_init="random" if injection != "none" else "embedding", seed=seed,
        init_std=std, embed_scale=scale, state_init_std=0.4 ** 0.5,
    )


def cell_verdict(fraction_no_fixed_point: float, degenerate: bool, last_cosine_distance: float,
                 direction_tol: float) -> str:
    """stable (most tokens reach an L2 fixed point) | direction converges while the norm keeps growing
    (cos(X_t, X_{t−1}) → 1 while ‖X‖ still moves, e.g. a pre-norm stream accumulating) | not stable;
    degenerate when all layers agree."""
    suffix = ", degenerate" if degenerate else ""
    if fraction_no_fixed_point < 0.5:
        return "stable" + suffix
    if last_cosine_distance < direction_tol:
        return "direction converges, norm still changing" + suffix
    return "not stable"


def run_cell(cfg: LoopedConfig, ids: torch.Tensor, mask: torch.Tensor, recurrences: int, converge_tol: float,
             direction_tol: float = 1e-4, precision: Precision | None = None, certificate_tokens: int = 0):
    """Capture one random model; return its verdict row, its per-recurrence curves and (certificate_tokens > 0)
    its certificates joined with the detector's labels (else None)."""
    model = (precision or Precision("cpu")).place(LoopedLM(cfg).eval())
    with torch.inference_mode():
        traj = capture(model, ids, recurrences=recurrences, mask=mask)
    summary = dynamics.degeneracy_summary(traj, converge_tol=converge_tol).iloc[0]
    check = dynamics.cyclic_fixed_point_check(traj)
    change = dynamics.successive_change(traj, finite_only=True)
    last = change[change.layer == cfg.n_block - 1][["recurrence", "l2_mean", "relative_mean", "cosine_mean"]]
    labels = dynamics.classify(traj)
    behaviour = labels["behaviour"].value_counts(normalize=True)
    last_cos_distance = float(1 - last["cosine_mean"].iloc[-1])
    degenerate = summary["min_cosine_to_first_mean"] >= SAME_POINT_COSINE
    verdict = cell_verdict(float(summary["fraction_no_fixed_point"]), degenerate, last_cos_distance, direction_tol)
    row = {
        "final_relative_change_last_layer": float(check["final_relative_change"].iloc[-1]),
        "max_final_relative_change": float(check["final_relative_change"].max()),
        "min_cosine_to_first_mean": float(summary["min_cosine_to_first_mean"]),
        "last_cosine_distance": last_cos_distance,
        "fraction_converged_distinct": float(summary["fraction_distinct_cyclic"]),
        "fraction_converged_degenerate": float(summary["fraction_degenerate"]),
        "fraction_fixed_point": float(behaviour.get("fixed_point", 0.0)),
        "fraction_at_floor": float(behaviour.get("at_floor", 0.0)),
        "fraction_orbit": float(behaviour.get("orbit", 0.0)),
        "fraction_slider": float(behaviour.get("slider", 0.0)),
        "fraction_divergent": float(behaviour.get("divergent", 0.0)),
        "verdict": verdict,
    }
    return row, last, cell_certificates(model, ids, mask, recurrences, certificate_tokens, labels)


def cell_certificates(model: LoopedLM, ids: torch.Tensor, mask: torch.Tensor, recurrences: int, n: int,
                      labels: pd.DataFrame) -> pd.DataFrame | None:
    """Certificates of n tokens spread over the first prompt's real tokens, joined with the detector's labels."""
    from loopscope.dynamics.spectrum import agreement
    from loopscope.experiments.certificate import spread_tokens, token_certificates

    if n <= 0:
        return None
    length = int(mask[0].sum())
    tokens = [t for _, t in spread_tokens([length], n)]
    cert = token_certificates(model, ids[:1, :length].cpu(), recurrences, tokens)
    cert.insert(0, "batch", 0)
    return agreement(cert, labels)


def grid_inputs(s: GridSettings) -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_tokenizer()
    ids, mask, _ = encode_prompts(tok, load_prompts("gsm-symbolic", limit=s.n_prompts), max_len=512)
    return ids[:, : s.max_tokens], mask[:, : s.max_tokens]


def run_grid(s: GridSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) every cell; returns (per-cell rows, per-recurrence curves of the last block layer)."""
    s.precision.device  # a bad --device fails here, in one line, before any cell runs
    if s.recurrences < 4:
        raise InputError(f"--recurrences {s.recurrences}: the fixed-point test needs at least 4 (the paper uses 128)")
    from loopscope.models.config import INJECTION_KINDS, NORM_KINDS

    for what, given, known in (("norm", s.norms, NORM_KINDS), ("injection", s.injections, INJECTION_KINDS)):
        if bad := [x for x in given if x not in known]:  # before any cell runs, not when the grid reaches it
            raise InputError(f"{what} {bad[0]!r} is not one of {', '.join(known)}")
    s.out.mkdir(parents=True, exist_ok=True)
    ids, mask = grid_inputs(s)
    cells = wanted_cells(s)
    todo = [c for c in cells if not cell_path(s, c).exists()]

    def compute(cell: tuple) -> dict:
        start = time.perf_counter()
        norm, injection, block, seed, width, rms = cell
        cfg = grid_config(norm, injection, block, seed, width, s.init_std, rms)
        row, last, cert = run_cell(cfg, ids, mask, s.recurrences, s.converge_tol, s.direction_tol, s.precision,
                                   s.certificate_tokens)
        key = dict(zip(CELL_COLUMNS, cell))
        return {"row": {**key, **row, "seconds": round(time.perf_counter() - start, 2)},
                "curves": last.assign(**key).to_dict(orient="list"),
                "certificates": None if cert is None else cert.assign(**key)[[*CELL_COLUMNS, *cert.columns]]
                .to_dict(orient="list")}

    for cell in tqdm(todo, desc="grid", disable=not s.progress, unit="model"):
        cached_json(cell_path(s, cell), lambda: compute(cell))  # the cell, whole or absent
    return write_tables(s, cells)


GRID_CACHE_VERSION = 1  # raised when what a cell's file holds changes


def cell_path(s: GridSettings, cell: tuple) -> Path:
    """OUT/cache/grid/<cell>-<key>.json: one finished cell (its row, curves and certificates in one atomic file),
    keyed on the cell and on every setting that changes what it holds — never reused under other settings."""
    key = run_key({"version": GRID_CACHE_VERSION, "cell": list(cell), "recurrences": s.recurrences,
                   "n_prompts": s.n_prompts, "max_tokens": s.max_tokens, "converge_tol": s.converge_tol,
                   "direction_tol": s.direction_tol, "init_std": s.init_std,
                   "certificate_tokens": s.certificate_tokens, "precision": repr(s.precision)})
    norm, injection, block, seed, width, rms = cell
    return s.out / "cache" / "grid" / f"{norm}-{injection}-k{block}-s{seed}-d{width}-e{rms:g}-{key}.json"


def write_tables(s: GridSettings, cells: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OUT/grid_cells.csv, grid_curves.csv, grid_certificates.csv from the finished cells `s` asks for (each written
    atomically, anything a previous run left there replaced); returns (cells, curves) as read back."""
    parts = [json.loads(cell_path(s, c).read_bytes()) for c in cells]  # every cell is finished by now
    rows = pd.DataFrame([p["row"] for p in parts])
    curves = pd.concat([pd.DataFrame(p["curves"]) for p in parts], ignore_index=True)
    certs = [pd.DataFrame(p["certificates"]) for p in parts if p["certificates"] is not None]
    paths = {"cells": s.out / "grid_cells.csv", "curves": s.out / "grid_curves.csv",
             "certificates": certificates_csv(s.out)}
    for name, table in (("cells", rows), ("curves", curves),
                        ("certificates", pd.concat(certs, ignore_index=True) if certs else None)):
        if table is None:
            paths[name].unlink(missing_ok=True)
        else:
            write_atomic(paths[name], table.to_csv(index=False).encode())
    return pd.read_csv(paths["cells"]), pd.read_csv(paths["curves"])


def wanted_cells(s: GridSettings) -> list[tuple]:
    """Every (norm, injection, block size, seed, width, injected RMS) cell `s` asks for."""
    return list(itertools.product(s.norms, s.injections, s.block_sizes, s.seeds, s.widths,
                                  [rms_key(r) for r in s.injected_rms]))


def certificates_csv(out: Path) -> Path:
    return Path(out) / "grid_certificates.csv"


def read_certificates(s: GridSettings) -> pd.DataFrame:
    """The certificates of the cells `s` asks for (empty when none were computed)."""
    path = certificates_csv(s.out)
    if not path.exists():
        return pd.DataFrame()
    cert = pd.read_csv(path).drop_duplicates(subset=[*CELL_COLUMNS, "token"], keep="last")
    wanted = cert.set_index(CELL_COLUMNS).index.isin(wanted_cells(s))
    return cert[wanted].reset_index(drop=True)


def certificate_agreement(cert: pd.DataFrame) -> pd.DataFrame:
    """Counts of (predicted behaviour, detector label) over every certified token, with the fraction that agree."""
    from loopscope.dynamics.spectrum import agreement_table

    return agreement_table(cert) if len(cert) else pd.DataFrame()


def agreement(measured: str, paper: str) -> str:
    """holds (same verdict) | partly (the paper's stable fixed point seen only as a converging direction) | differs."""
    if measured == paper:
        return "holds"
    if paper.startswith("stable") and measured.startswith("direction converges") and \
            paper.endswith("degenerate") == measured.endswith("degenerate"):
        return "partly"
    return "differs"


def is_default(d_model, injected_rms) -> bool:
    """Whether a (width, injected RMS) setting is the grid's default (DEFAULT_SETTING)."""
    return int(d_model) == DEFAULT_SETTING["d_model"] and rms_key(injected_rms) == DEFAULT_SETTING["injected_rms"]


def verdict_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm, injection, width, injected RMS): our majority verdict over block sizes and seeds, beside
    the paper's; `default` marks the setting chosen before any run (DEFAULT_SETTING)."""
    rows = []
    for (norm, injection, width, rms), part in cells.groupby(["norm", "injection", *SETTING_COLUMNS], sort=False):
        counts = part["verdict"].value_counts()
        ours = counts.index[0]
        paper = PAPER_VERDICTS.get((norm, injection), "—")
        by_block = {f"k={k}": p["verdict"].value_counts().index[0] for k, p in part.groupby("block_size")}
        rows.append({
            "norm": norm, "injection": injection, "d_model": int(width), "injected_rms": float(rms),
            "default": is_default(width, rms), "paper": paper, "measured": ours,
            "agreement": agreement(ours, paper), **by_block,
            "cells": f"{counts.iloc[0]}/{len(part)}",
            "min_cosine_to_first": part["min_cosine_to_first_mean"].mean(),
            "final_relative_change": part["final_relative_change_last_layer"].median(),
        })
    return pd.DataFrame(rows)


def shown_setting(cells: pd.DataFrame) -> tuple[int, float]:
    """The (width, injected RMS) whose curves the report draws: the default when the grid ran it, else the first."""
    settings = list(dict.fromkeys(zip(cells["d_model"].astype(int), cells["injected_rms"].astype(float))))
    return next((x for x in settings if is_default(*x)), settings[0])


def change_curves(curves: pd.DataFrame, setting: tuple[int, float]) -> pd.DataFrame:
    """The last block layer's change per (norm, injection, block size, recurrence) at one (width, injected RMS)
    setting, mean over seeds and tokens."""
    at = curves[(curves["d_model"] == setting[0]) & (curves["injected_rms"].map(rms_key) == rms_key(setting[1]))]
    return at.groupby(["norm", "injection", "block_size", "recurrence"], as_index=False)[
        ["l2_mean", "cosine_mean"]].mean()


def min_cosine_matrix(cells: pd.DataFrame) -> pd.DataFrame:
    """The degeneracy test per norm/injection (rows "norm/injection", with " D=…, rms=…" when the grid ran more than
    one setting) and block size (columns "k=…"): the min cosine between layer 0's fixed point and any other layer's,
    mean over seeds (the paper's Fig. 6, right)."""
    keys = ["norm", "injection", *SETTING_COLUMNS]
    table = cells.groupby([*keys, "block_size"], as_index=False)["min_cosine_to_first_mean"].mean()
    pivot = table.pivot_table(index=keys, columns="block_size", values="min_cosine_to_first_mean", sort=False)
    pivot.columns = [f"k={c}" for c in pivot.columns]
    several = cells[SETTING_COLUMNS].drop_duplicates().shape[0] > 1
    pivot.index = [f"{n}/{i}" + (f" D={d}, rms={r:g}" if several else "") for n, i, d, r in pivot.index]
    return pivot


def grid_views(cells: pd.DataFrame, curves: pd.DataFrame, certificates: pd.DataFrame | None = None) -> dict:
    """Everything the grid section draws, as `add_grid_section` takes it (the report computes nothing)."""
    cert = certificates if certificates is not None else pd.DataFrame()
    setting = shown_setting(cells)
    return {"cells": cells, "change_curves": change_curves(curves, setting), "min_cosine": min_cosine_matrix(cells),
            "verdicts": verdict_table(cells), "certificates": cert, "shown_setting": setting,
            "same_point_cosine": SAME_POINT_COSINE,
            "certificate_agreement": certificate_agreement(cert) if len(cert) else pd.DataFrame()}


def run_grid_report(s: GridSettings) -> Path:
    """Run the grid and write OUT/index.html."""
    from loopscope.output import claim_output, settings_of

    with claim_output(s.out, "grid", settings_of(s, ("out", "progress", "overwrite", "curves")),
                      overwrite=s.overwrite) as folder:
        index = write_grid_report(s)
        folder.finish(index)
    return index


def write_grid_report(s: GridSettings) -> Path:
    from loopscope.report import Report
    from loopscope.report.grid_section import add_grid_section

    start = time.perf_counter()
    cells, curves = run_grid(s)
    report = Report("loopscope grid — fixed points at random initialisation", s.out, meta={
        "norms": ", ".join(s.norms), "injections": ", ".join(s.injections),
        "block sizes": ", ".join(map(str, s.block_sizes)), "seeds": ", ".join(map(str, s.seeds)),
        "recurrences": s.recurrences, "widths": ", ".join(map(str, s.widths)),
        "injected RMS": ", ".join(f"{r:g}" for r in s.injected_rms) + f" (default {DEFAULT_SETTING['injected_rms']}: "
        "Huginn's rule)",
        "init": (f"weights N(0, {s.init_std}²)" if s.init_std else "weights N(0, 2/(5D)) (Huginn's rule)")
        + ", embeddings scaled to the injected RMS, start state TruncNormal(0, 2/5) with injection, the embedding "
        "without",
    })
    add_grid_section(report, **grid_views(cells, curves, read_certificates(s)))
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    return report.write()
