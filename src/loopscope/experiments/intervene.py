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
from loopscope.interventions import Intervention, ZeroSublayer, next_token_kl, summarize_kl
from loopscope.interventions.run import capture_under, check_recurrences
from loopscope.interventions.specs import spec_text
from loopscope.models.device import Precision
from loopscope.models.load import LoadedModel
from loopscope.output import claim_output, settings_of
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
    precision: Precision = field(default_factory=Precision)
    overwrite: bool = False  # replace what an earlier run with other settings left in `out`

    def check(self) -> None:
        if bool(self.specs) == self.massive_activation_ablation:
            raise InputError("give exactly one of: intervention options (--zero-mlp, --zero-attn, --delete, --swap) "
                             "or --massive-activation-ablation (which chooses the MLP to zero itself)")
        if self.recurrences is not None and self.recurrences < 1:
            raise InputError(f"--recurrences {self.recurrences}: give at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: give at least 1")


def run_recurrences(loaded: LoadedModel, requested: int | None) -> int:
    if not loaded.is_looped:
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


@dataclass
class BeforeAfter:
    """Two captures (with attention) of the same prompts: the unchanged model, then under `specs`."""

    before: Trajectory
    after: Trajectory
    specs: list[Intervention]
    massive: dict | None  # `stages.massive_activation_layer` of the unchanged run, when it chose the specs
    norms_before: pd.DataFrame  # `stages.residual_norms(…, include_embed=True)` of each run, computed once
    norms_after: pd.DataFrame


def capture_before_after(loaded: LoadedModel, prompts: list[str], R: int, specs: list[Intervention] | None = None, *,
                         batch_size: int = 8, progress: bool = True) -> BeforeAfter:
    """Capture the unchanged model, then the model under `specs`; specs=None zeroes the MLP of the
    massive-activation onset layer found in the first capture (`massive_ablation_specs`)."""
    def run(under: list[Intervention]) -> Trajectory:
        return capture_under(loaded, prompts, under, R, attention=True, batch_size=batch_size, progress=progress)

    if specs is not None:
        check_recurrences(specs, R)  # before the first capture: a bad spec fails at once
    with torch.inference_mode():
        before = run([])
        norms_before = stages.residual_norms(before, include_embed=True)
        found = None
        if specs is None:
            specs, found = massive_ablation_specs(norms_before)
        after = run(specs)
    return BeforeAfter(before, after, specs, found, norms_before, stages.residual_norms(after, include_embed=True))


def ablation_summary(name: str, found: dict, ratio_after: float, before: pd.DataFrame, after: pd.DataFrame,
                     kl_summary: pd.DataFrame) -> dict:
    """One row of a massive-activation ablation, the numbers `experiments.claims` judges "stages vanish" by:
    the onset layer zeroed, the largest peak/median |x| before and after, and for each attention stage metric
    (ColSum concentration, sink rate) its mean and range over the states before and after, with
    kept = mean after / mean before: 1 when the attention stages survive the ablation, near 0 when the sinks and
    the concentration they cause vanish (Blayney et al. 2026, Fig. 41; Queipo-de-Llano et al. §3.3: massive
    activations → attention sinks → compression). `found`: `stages.massive_activation_layer` of the unchanged
    run; ratio_after: the largest peak/median |x| after the ablation."""
    row = {"model": name, "segment": found["segment"], "layer": found["layer"],
           "massive_ratio_before": found["max_ratio"], "massive_ratio_after": ratio_after,
           "has_massive_activations": found["massive"]}
    for metric in ("colsum_concentration_mean", "sink_rate_mean"):
        short = metric.removesuffix("_mean")
        for label, table in (("before", before), ("after", after)):
            y = table[metric].astype(float) if metric in table else pd.Series(dtype=float)
            row[f"{short}_{label}"] = float(y.mean())
            row[f"{short}_range_{label}"] = float(y.max() - y.min()) if y.notna().any() else float("nan")
        b, a = row[f"{short}_before"], row[f"{short}_after"]
        row[f"{short}_kept"] = a / b if b > 0 else float("nan")
    k = kl_summary.iloc[0]
    row.update(mean_kl=float(k["mean_kl"]), top1_agreement=float(k["top1_agreement"]), n_tokens=int(k["n"]))
    return row


def massive_ablation_tables(loaded: LoadedModel, name: str, prompts: list[str], R: int, *, batch_size: int = 8,
                            progress: bool = True) -> dict[str, pd.DataFrame]:
    """The massive-activation ablation of one model without the logit lens (the attention stages and the norms
    are what Fig. 41 reads): `summary` (one `ablation_summary` row, plus the model's kind and R) and `states`
    (per state and run, before / after: peak / median |x|, sink rate, ColSum concentration)."""
    run = capture_before_after(loaded, prompts, R, batch_size=batch_size, progress=progress)
    keys = ["segment", "recurrence", "layer", "depth"]
    tables, ratios, parts = {}, {}, []
    for label, traj, norms in (("before", run.before, run.norms_before), ("after", run.after, run.norms_after)):
        tables[label] = stage_table(traj, None)
        ratios[label] = stages.massive_activation_profile(norms)[[*keys, "ratio"]]
        part = tables[label][[*keys, "sink_rate_mean", "colsum_concentration_mean"]].merge(ratios[label], on=keys)
        parts.append(part.rename(columns={"ratio": "massive_ratio"}).assign(run=label))
    kl = summarize_kl(next_token_kl(run.before, run.after))
    row = ablation_summary(name, run.massive, float(ratios["after"]["ratio"].max()), tables["before"],
                           tables["after"], kl)
    row.update(kind=loaded.kind, recurrences=R)
    return {"summary": pd.DataFrame([row]), "states": pd.concat(parts, ignore_index=True)}


def run_intervene(s: InterveneSettings, loaded: LoadedModel | None = None) -> Path:
    """Capture before, apply the interventions, capture after, write OUT/index.html; returns its path.

    `loaded`: an already loaded model to use instead of loading `s.model` (tests, notebooks)."""
    s.check()
    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    with claim_output(s.out, "intervene", settings_of(s), overwrite=s.overwrite) as folder:
        return write_intervene(s, prompts, loaded, folder)


def write_intervene(s: InterveneSettings, prompts: list[str], loaded: LoadedModel | None, folder) -> Path:
    start = time.perf_counter()
    loaded = s.precision.load(s.model) if loaded is None else loaded
    folder.record_weights(loaded.name, loaded.fingerprint())
    R = run_recurrences(loaded, s.recurrences)
    readout = model_readout(loaded)
    run = capture_before_after(loaded, prompts, R, None if s.massive_activation_ablation else s.specs,
                               batch_size=s.batch_size, progress=s.progress)
    before_traj, after_traj, specs, found = run.before, run.after, run.specs, run.massive
    kl = next_token_kl(before_traj, after_traj)
    before, after = stage_table(before_traj, readout), stage_table(after_traj, readout)
    comparisons = {"after vs before": alignment_to_baseline(before, after)}
    ff_table, ff_name = None, None
    if s.feedforward:
        ff = s.precision.load(s.feedforward)
        ff_name = ff.name
        with torch.inference_mode():
            ff_table = stage_table(capture_prompts(ff, prompts, 1, attention=True, batch_size=s.batch_size,
                                                   progress=s.progress), model_readout(ff))
        comparisons[f"before vs {ff_name}"] = alignment_table(before, ff_table)
        comparisons[f"after vs {ff_name}"] = alignment_table(after, ff_table)
    what = "; ".join(spec_text(spec) for spec in specs)
    report = Report(f"loopscope intervene — {loaded.name}", s.out, meta={
        "model": loaded.name, "intervention": what,
        "chosen by": "massive-activation onset rule (loopscope.stages.massive)" if found else "the options given",
        "prompts": f"{s.prompts} ({len(prompts)} prompts, {int(before_traj.mask.sum())} tokens)",
        "recurrences": R,
    })
    add_intervention_section(
        report, what=what, kl_summary=summarize_kl(kl), profiles=profile_summary({"before": before, "after": after}),
        alignment=alignment_summary(comparisons), massive=found,
        massive_profile=massive_profile(run.norms_before, run.norms_after),
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
    index = report.write()
    folder.finish(index)
    return index
