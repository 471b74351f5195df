"""`loopscope intervene`: change a run (zero a sublayer, delete or swap layers), re-capture, and report every
stage metric before against after, with the KL of the output distribution to the unchanged model.

`--massive-activation-ablation` is Blayney et al. 2026 §5 / Fig. 41 as one command: find the layer whose output
first carries the massive activations (`loopscope.stages.massive`: the onset rule), zero its MLP at every
recurrence, and report whether the stages vanish (profiles flatten, alignment drops) and how far the output moves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from loopscope import stages
from loopscope.capture import Trajectory, capture_prompts
from loopscope.data.prompts import load_prompts
from loopscope.errors import InputError
from loopscope.experiments.stage_tables import (
    STAGE_METRICS,
    alignment_table,
    alignment_to_baseline,
    model_readout,
    profile_summary,
    stage_table,
)
from loopscope.interventions import Intervention, ZeroSublayer, describe, intervene, next_token_kl, summarize_kl
from loopscope.interventions.run import check_recurrences
from loopscope.models.load import LoadedModel, load_model
from loopscope.report import Report
from loopscope.report.intervene_section import add_intervention_section, add_kl_section
from loopscope.report.stages_section import add_stages_section


@dataclass
class InterveneSettings:
    model: str = "default"  # builtin name or checkpoint path
    prompts: str = "gsm-symbolic"  # builtin prompt set or file
    out: Path = Path("reports/intervene")
    specs: list[Intervention] = field(default_factory=list)  # what to change (see interventions.parse)
    massive_activation_ablation: bool = False  # choose the spec automatically: zero the massive-activation MLP
    recurrences: int | None = None  # R of both runs; None = the model's own (1 for a feedforward model)
    feedforward: str | None = None  # a feedforward model both runs are aligned with (e.g. smollm2)
    max_prompts: int | None = 8  # interventions compare two full captures with attention: keep it small
    batch_size: int = 8
    progress: bool = True

    def check(self) -> None:
        if bool(self.specs) == self.massive_activation_ablation:
            raise InputError("give exactly one of: intervention options (--zero-mlp, --zero-attn, --delete, --swap) "
                             "or --massive-activation-ablation (which chooses the MLP to zero itself)")
        if self.recurrences is not None and self.recurrences < 1:
            raise InputError(f"--recurrences {self.recurrences}: give at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: give at least 1")


def run_recurrences(loaded: LoadedModel, requested: int | None) -> int:
    if loaded.kind != "looped":
        if requested not in (None, 1):
            raise InputError(f"--recurrences {requested}: {loaded.name} is a feedforward model and runs once; "
                             "leave --recurrences out")
        return 1
    return loaded.recurrences if requested is None else requested


def massive_ablation_specs(norms: pd.DataFrame) -> tuple[list[Intervention], dict]:
    """Zero the MLP of the onset layer of `stages.massive_activation_layer`, at every recurrence."""
    found = stages.massive_activation_layer(norms)
    return [ZeroSublayer(found["segment"], found["layer"], "mlp")], found


def massive_profile(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per state: the massive-activation profile before and after, side by side (outer join on the state)."""
    keys = ["segment", "recurrence", "layer", "depth"]
    b = stages.massive_activation_profile(before)[[*keys, "peak", "ratio", "growth", "onset"]]
    a = stages.massive_activation_profile(after)[[*keys, "peak", "ratio"]]
    merged = b.merge(a, on=keys, how="outer", suffixes=("_before", "_after"))
    return merged.sort_values("depth", kind="stable").reset_index(drop=True)


def alignment_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean over recurrences of pearson / spearman / nrmse, per metric and comparison (one row each)."""
    rows = []
    for name, table in tables.items():
        if table is None or table.empty:
            continue
        means = table.groupby("metric", sort=False)[["pearson", "spearman", "rmse", "nrmse"]].mean().reset_index()
        rows.append(means.assign(comparison=name))
    if not rows:
        return pd.DataFrame()
    out = pd.concat(rows, ignore_index=True)
    return out[["comparison", "metric", "pearson", "spearman", "rmse", "nrmse"]]


def capture_run(loaded: LoadedModel, prompts: list[str], R: int, s: InterveneSettings) -> Trajectory:
    # no cache_dir: the capture cache is keyed by model and prompts, not by interventions
    return capture_prompts(loaded, prompts, R, attention=True, batch_size=s.batch_size, progress=s.progress)


def run_intervene(s: InterveneSettings, loaded: LoadedModel | None = None) -> Path:
    """Capture before, apply the interventions, capture after, write OUT/index.html; returns its path.

    `loaded`: an already loaded model to use instead of loading `s.model` (tests, notebooks)."""
    s.check()
    start = time.perf_counter()
    loaded = load_model(s.model) if loaded is None else loaded
    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    R = run_recurrences(loaded, s.recurrences)
    readout = model_readout(loaded)
    with torch.inference_mode():
        before_traj = capture_run(loaded, prompts, R, s)
        norms_before = stages.residual_norms(before_traj, include_embed=True)
        specs, found = (massive_ablation_specs(norms_before) if s.massive_activation_ablation else (s.specs, None))
        check_recurrences(specs, R)
        with intervene(loaded.model, specs):
            after_traj = capture_run(loaded, prompts, R, s)
    kl = next_token_kl(before_traj, after_traj)
    before, after = stage_table(before_traj, readout), stage_table(after_traj, readout)
    comparisons = {"after vs before": alignment_to_baseline(before, after)}
    ff_table, ff_name = None, None
    if s.feedforward:
        ff = load_model(s.feedforward)
        ff_name = ff.name
        with torch.inference_mode():
            ff_table = stage_table(capture_prompts(ff, prompts, 1, attention=True, batch_size=s.batch_size,
                                                   progress=s.progress), model_readout(ff))
        comparisons[f"before vs {ff_name}"] = alignment_table(before, ff_table)
        comparisons[f"after vs {ff_name}"] = alignment_table(after, ff_table)
    what = "; ".join(", ".join(f"{k}={v}" for k, v in describe(spec).items()) for spec in specs)
    report = Report(f"loopscope intervene — {loaded.name}", s.out, meta={
        "model": loaded.name, "intervention": what,
        "chosen by": "massive-activation onset rule (loopscope.stages.massive)" if found else "the options given",
        "prompts": f"{s.prompts} ({len(prompts)} prompts, {int(before_traj.mask.sum())} tokens)",
        "recurrences": R,
    })
    add_intervention_section(
        report, what=what, kl_summary=summarize_kl(kl), profiles=profile_summary({"before": before, "after": after}),
        alignment=alignment_summary(comparisons), massive=found,
        massive_profile=massive_profile(norms_before, stages.residual_norms(after_traj, include_embed=True)),
    )
    add_stages_section(report, after, STAGE_METRICS, model_name=f"{loaded.name} after the intervention",
                       feedforward=ff_table, ff_name=ff_name or "feedforward",
                       alignment=comparisons.get(f"after vs {ff_name}"), baseline=before,
                       baseline_name="before (unchanged model)",
                       note="Alignment of every pass with the unchanged model: tables/alignment_to_baseline.csv.")
    report.table(report.sections[-1], comparisons["after vs before"], "alignment_to_baseline",
                 "Alignment of each recurrence's stage profile after the intervention with the same recurrence "
                 "before it (pearson 1, rmse 0: that stage profile is unchanged).", max_rows=40)
    add_kl_section(report, kl)
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    return report.write()
