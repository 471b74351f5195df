"""`loopscope grid`: which architectures reach a stable cyclic fixed point at random initialisation?

Blayney et al. (2026) §4.2, Fig. 6 and Figs. 29–31: recurrent blocks of 4, 12 and 16 layers, no prelude or
coda, norm ∈ {pre, sandwich (Huginn), ouro} × input injection ∈ {none, concat}, 3 seeds, 128 recurrences.
Their finding: with injection every norm but Ouro's reaches a stable fixed point; without injection only
pre-norm does, and that fixed point is degenerate (every layer converges to the same point).

Each cell is one randomly initialised `LoopedLM` run on the same token sequences; its verdict comes from
`dynamics.degeneracy_summary` (distinct / degenerate / no fixed point). Finished cells are appended to
OUT/grid_cells.csv as they complete, so an interrupted grid resumes where it stopped.

Each cell also certifies `certificate_tokens` tokens of its first prompt (`experiments.certificate`: the leading
eigenvalues of the block map's Jacobian at the state after R recurrences) and joins the prediction with the
detector's label and observed step-size rate: OUT/grid_certificates.csv, one row per (cell, token). That is the
paper's open "why": whether injection and norm placement make the block a contraction (ρ < 1) or not.
"""

from __future__ import annotations

import itertools
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
from loopscope.errors import InputError
from loopscope.dynamics.degeneracy import SAME_POINT_COSINE
from loopscope.models import LoopedConfig, LoopedLM
from loopscope.models.device import Precision

# The paper's verdicts (§4.2, §6.1), independent of block size ("qualitatively identical" for 4, 12, 16 layers).
PAPER_VERDICTS = {
    ("pre", "concat"): "stable",
    ("sandwich", "concat"): "stable",
    ("ouro", "concat"): "not stable",
    ("pre", "none"): "stable, degenerate",
    ("sandwich", "none"): "not stable",
    ("ouro", "none"): "not stable",
}
CELL_COLUMNS = ["norm", "injection", "block_size", "seed"]


@dataclass
class GridSettings:
    out: Path = Path("reports/grid")
    norms: tuple[str, ...] = ("pre", "sandwich", "ouro")
    injections: tuple[str, ...] = ("none", "concat")
    block_sizes: tuple[int, ...] = (4, 12, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    recurrences: int = 128
    d_model: int = 64
    n_prompts: int = 4
    max_tokens: int = 48  # prompts truncated to this many tokens (dynamics are per token)
    converge_tol: float = 1e-3  # last layer's relative change at the last recurrence below this = converged
    direction_tol: float = 1e-4  # 1 − cos(X_t, X_{t−1}) below this (with a growing norm) = the direction converged
    init_std: float | None = None  # weight std; None = Huginn's rule sqrt(2/(5D)) (the paper's is not published)
    certificate_tokens: int = 4  # tokens of the first prompt certified per cell (0: none)
    progress: bool = True
    curves: dict = field(default_factory=dict)
    precision: Precision = field(default_factory=Precision)


def grid_config(norm: str, injection: str, block: int, seed: int, d_model: int,
                init_std: float | None = None) -> LoopedConfig:
    """A (0, k⊗R, 0) model with Huginn's scales: weights N(0, 2/(5D)), embeddings × √D, start state
    TruncNormal(0, 2/5) with injection (Huginn's s_0 = σ·√D), the embedding itself without (it must).

    Without a prelude the injected signal is the scaled embedding; unscaled (‖e‖ ≈ 0.6 against a normalised
    state of norm √D = 8) injection would carry almost nothing and every cell would run autonomously.
    """
    return LoopedConfig(
        name=f"{norm}-{injection}-k{block}-s{seed}", vocab_size=1024, d_model=d_model, n_heads=4,
        d_mlp=int(8 * d_model / 3), n_prelude=0, n_block=block, n_coda=0, recurrences=8, norm=norm,
        injection=injection, state_init="random" if injection != "none" else "embedding", seed=seed,
        init_std=init_std or (2 / (5 * d_model)) ** 0.5, embed_scale=d_model ** 0.5, state_init_std=0.4 ** 0.5,
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
    s.out.mkdir(parents=True, exist_ok=True)
    cells_csv, curves_csv, cert_csv = s.out / "grid_cells.csv", s.out / "grid_curves.csv", certificates_csv(s.out)
    done = pd.read_csv(cells_csv) if cells_csv.exists() else pd.DataFrame(columns=CELL_COLUMNS)
    curves = [pd.read_csv(curves_csv)] if curves_csv.exists() else []
    finished = {tuple(r) for r in done[CELL_COLUMNS].itertuples(index=False)}
    ids, mask = grid_inputs(s)
    todo = [c for c in itertools.product(s.norms, s.injections, s.block_sizes, s.seeds) if c not in finished]
    for norm, injection, block, seed in tqdm(todo, desc="grid", disable=not s.progress, unit="model"):
        start = time.perf_counter()
        row, last, cert = run_cell(grid_config(norm, injection, block, seed, s.d_model, s.init_std), ids, mask,
                                   s.recurrences, s.converge_tol, s.direction_tol, s.precision, s.certificate_tokens)
        key = dict(zip(CELL_COLUMNS, (norm, injection, block, seed)))
        if cert is not None:  # before the cell's row: a cell in grid_cells.csv has its certificates written
            cert = cert.assign(**key)[[*CELL_COLUMNS, *cert.columns]]
            cert.to_csv(cert_csv, mode="a", header=not cert_csv.exists(), index=False)
        row = {**key, **row, "seconds": round(time.perf_counter() - start, 2)}
        pd.DataFrame([row]).to_csv(cells_csv, mode="a", header=not cells_csv.exists(), index=False)
        last = last.assign(**key)
        last.to_csv(curves_csv, mode="a", header=not curves_csv.exists(), index=False)
        curves.append(last)
    cells = pd.read_csv(cells_csv)
    wanted = cells.set_index(CELL_COLUMNS).index.isin(list(itertools.product(s.norms, s.injections, s.block_sizes, s.seeds)))
    return cells[wanted].reset_index(drop=True), pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()


def certificates_csv(out: Path) -> Path:
    return Path(out) / "grid_certificates.csv"


def read_certificates(s: GridSettings) -> pd.DataFrame:
    """The certificates of the cells `s` asks for (empty when none were computed)."""
    path = certificates_csv(s.out)
    if not path.exists():
        return pd.DataFrame()
    cert = pd.read_csv(path).drop_duplicates(subset=[*CELL_COLUMNS, "token"], keep="last")
    wanted = cert.set_index(CELL_COLUMNS).index.isin(list(itertools.product(s.norms, s.injections, s.block_sizes,
                                                                            s.seeds)))
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


def verdict_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm, injection): our majority verdict over block sizes and seeds, beside the paper's."""
    rows = []
    for (norm, injection), part in cells.groupby(["norm", "injection"], sort=False):
        counts = part["verdict"].value_counts()
        ours = counts.index[0]
        paper = PAPER_VERDICTS.get((norm, injection), "—")
        by_block = {f"k={k}": p["verdict"].value_counts().index[0] for k, p in part.groupby("block_size")}
        rows.append({
            "norm": norm, "injection": injection, "paper": paper, "measured": ours,
            "agreement": agreement(ours, paper), **by_block,
            "cells": f"{counts.iloc[0]}/{len(part)}",
            "min_cosine_to_first": part["min_cosine_to_first_mean"].mean(),
            "final_relative_change": part["final_relative_change_last_layer"].median(),
        })
    return pd.DataFrame(rows)


def change_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The last block layer's change per (norm, injection, block size, recurrence), mean over seeds and tokens."""
    return curves.groupby(["norm", "injection", "block_size", "recurrence"], as_index=False)[
        ["l2_mean", "cosine_mean"]].mean()


def min_cosine_matrix(cells: pd.DataFrame) -> pd.DataFrame:
    """The degeneracy test per norm/injection (rows "norm/injection") and block size (columns "k=…"): the min cosine
    between layer 0's fixed point and any other layer's, mean over seeds (the paper's Fig. 6, right)."""
    table = cells.groupby(["norm", "injection", "block_size"], as_index=False)["min_cosine_to_first_mean"].mean()
    pivot = table.pivot_table(index=["norm", "injection"], columns="block_size", values="min_cosine_to_first_mean")
    pivot.columns = [f"k={c}" for c in pivot.columns]
    pivot.index = [f"{n}/{i}" for n, i in pivot.index]
    return pivot


def grid_views(cells: pd.DataFrame, curves: pd.DataFrame, certificates: pd.DataFrame | None = None) -> dict:
    """Everything the grid section draws, as `add_grid_section` takes it (the report computes nothing)."""
    cert = certificates if certificates is not None else pd.DataFrame()
    return {"cells": cells, "change_curves": change_curves(curves), "min_cosine": min_cosine_matrix(cells),
            "verdicts": verdict_table(cells), "certificates": cert,
            "certificate_agreement": certificate_agreement(cert) if len(cert) else pd.DataFrame()}


def run_grid_report(s: GridSettings) -> Path:
    """Run the grid and write OUT/index.html."""
    from loopscope.report import Report
    from loopscope.report.grid_section import add_grid_section

    start = time.perf_counter()
    cells, curves = run_grid(s)
    report = Report("loopscope grid — fixed points at random initialisation", s.out, meta={
        "norms": ", ".join(s.norms), "injections": ", ".join(s.injections),
        "block sizes": ", ".join(map(str, s.block_sizes)), "seeds": ", ".join(map(str, s.seeds)),
        "recurrences": s.recurrences, "width": s.d_model,
        "init": (f"weights N(0, {s.init_std}²)" if s.init_std else "weights N(0, 2/(5D)) (Huginn's rule)")
        + ", embeddings × √D, start state TruncNormal(0, 2/5) with injection, the embedding without",
    })
    add_grid_section(report, **grid_views(cells, curves, read_certificates(s)))
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    return report.write()
