"""The paper's pretrained study on checkpoints a user brings (`loopscope reproduce --pretrained`): Ouro,
Huginn-0125 and a retrofitted model given by path, against a feedforward reference (Llama-3.2-1B in the paper)
(Blayney et al. 2026 §4 item 3 / Fig. 4, §5 items 2–3 / Figs. 8, 9, 36, 40, §6.2, App. C).

Which model plays which part is said on the command line, never guessed from a name: `--looped FAMILY=PATH`
(FAMILY one of `FAMILIES`; the checkpoint must load as that family) and `--feedforward NAME=PATH` (a Hugging Face
feedforward folder). The builtin `smollm2-looped` (a real healed retrofit of SmolLM2) stands in for the retrofit
family when no retrofit checkpoint is given, aligned with its own base (`smollm2`); no other builtin (`default`,
the toy presets) ever stands in for a pretrained family: those rows are "not measurable here" instead.

Stages (each cached under OUT/stages/, keyed by the checkpoint's file hashes, so a changed checkpoint reruns):

    pretrained-reference-NAME  the feedforward reference's stage profile (one pass, with attention), over all
                               prompts and prompt by prompt
    pretrained-FAMILY          `analyze` of the looped model at R (dynamics, per-token behaviours, attention,
                               stages), then its stage profile prompt by prompt at the attention recurrences,
                               aligned with the reference's profile of the same prompt; per-prompt units for the
                               bootstrap: fixed points, the last block layer's relative step at R, the ColSum
                               alignment, the largest peak/median |x|
    pretrained-ablate-retrofit the Fig. 41 ablation on the retrofit: the MLP of the layer where its massive
                               activations begin zeroed at every pass, stages before / after
    pretrained-conditions      App. C on Huginn: orbit/slider rates under the system-prompt conditions
                               (`experiments.conditions`)

`pretrained_measurements` turns the finished stages into the tables `experiments.pretrained_claims` judges; the
report writes each of them as tables/NAME.csv, so every judged row can be recomputed from the CSVs.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loopscope.errors import InputError

FAMILIES = ("ouro", "huginn", "retrofit")  # the paper's pretrained looped families, in its order
STAND_IN, STAND_IN_BASE = "smollm2-looped", "smollm2"  # the builtin retrofit and its base


@dataclass(frozen=True)
class PretrainedModel:
    family: str  # ouro | huginn | retrofit
    spec: str  # a checkpoint path (or STAND_IN)
    reference: str | None  # name of the feedforward model its stages are aligned with (None: none given)
    stand_in: bool = False  # the builtin smollm2-looped standing in for a retrofit checkpoint


@dataclass(frozen=True)
class PretrainedPlan:
    models: tuple[PretrainedModel, ...]
    references: dict[str, str] = field(default_factory=dict)  # feedforward name → spec
    questions: int = 256  # GSM8K test-subset questions (the paper's 256)
    recurrences: int = 128  # R of the dynamics (the paper's)
    attention_recurrences: int = 8  # R of the stage profiles (the paper's Figs. 8, 34: 8 recurrences)
    conditions_questions: int = 256  # App. C on Huginn (the paper: the GSM8K test set)
    conditions_recurrences: int = 128  # App. C's R
    certificate_tokens: int = 16
    stage_metrics: tuple[str, ...] | None = None  # STAGE_METRICS drawn per model in the report (None: all)
    dynamics_pages: bool = True  # the per-model dynamics figures in the report (quick: off, ~15 s a model)

    def model(self, family: str) -> PretrainedModel | None:
        return next((m for m in self.models if m.family == family), None)


# ---------------------------------------------------------------------------------------------- the plan

def parse_spec(spec: str, option: str) -> tuple[str, str]:
    name, eq, path = spec.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise InputError(f"{option} {spec!r}: give NAME=PATH, e.g. {option} "
                         + ("ouro=/ckpt/Ouro-1.4B" if option == "--looped" else "llama=/ckpt/Llama-3.2-1B"))
    return name.strip(), path.strip()


def recognised_kind(path: Path) -> str | None:
    """The loader kind that would load `path` (`models.load.LOADER_ORDER`), or None."""
    from loopscope.models.load import LOADERS, _import_loaders

    _import_loaders()
    return next((kind for kind, recognises, _ in LOADERS if recognises(path)), None)


def builtin_names() -> list[str]:
    from loopscope.models.load import BUILTINS, _import_loaders

    _import_loaders()
    return sorted(BUILTINS)


def pretrained_plan(looped: list[str], feedforward: list[str], questions: int | None = None,
                    recurrences: int | None = None, attention_recurrences: int | None = None,
                    conditions_questions: int | None = None, certificate_tokens: int | None = None,
                    stage_metrics: tuple[str, ...] | None = None, dynamics_pages: bool = True) -> PretrainedPlan:
    """The plan from `--looped FAMILY=PATH` and `--feedforward NAME=PATH` specs; InputError, in one line, for a
    malformed spec, an unknown family, a missing path, a builtin toy given as a pretrained family, or a checkpoint
    that is not the family it is given as."""
    builtins = builtin_names()
    references: dict[str, str] = {}
    for spec in feedforward:
        name, path = parse_spec(spec, "--feedforward")
        if references:
            raise InputError(f"--feedforward {spec!r}: give one feedforward reference (every looped model's stages "
                             f"are aligned with it); {next(iter(references))} was given already")
        if path in builtins:
            raise InputError(f"--feedforward {spec!r}: {path} is a builtin, not the paper's feedforward Llama; give "
                             "the path of a Hugging Face feedforward checkpoint (e.g. Llama-3.2-1B)")
        p = Path(path)
        if not p.exists():
            raise InputError(f"--feedforward {spec!r}: {path} does not exist; give the folder of a downloaded "
                             "Hugging Face feedforward checkpoint")
        if recognised_kind(p) != "feedforward-hf":
            raise InputError(f"--feedforward {spec!r}: {path} is not a Hugging Face feedforward checkpoint "
                             f"(loopscope reads it as {recognised_kind(p) or 'nothing it knows'})")
        references[name] = str(p.resolve())
    reference = next(iter(references), None)
    models: dict[str, PretrainedModel] = {}
    for spec in looped:
        family, path = parse_spec(spec, "--looped")
        if family not in FAMILIES:
            raise InputError(f"--looped {spec!r}: unknown family {family!r}; give one of {', '.join(FAMILIES)}")
        if family in models:
            raise InputError(f"--looped {spec!r}: {family} was given twice; give one checkpoint per family")
        if family == "retrofit" and path == STAND_IN:
            models[family] = PretrainedModel(family, STAND_IN, STAND_IN_BASE, stand_in=True)
            continue
        if path in builtins:
            raise InputError(f"--looped {spec!r}: {path} is a builtin, and a builtin never stands in for a "
                             f"pretrained {family} model; give the path of the published {family} checkpoint"
                             + (f" (or {STAND_IN} for retrofit)" if family == "retrofit" else ""))
        p = Path(path)
        if not p.exists():
            raise InputError(f"--looped {spec!r}: {path} does not exist; give the folder of the downloaded {family} "
                             "checkpoint (docs/real-checkpoints.md)")
        kind = recognised_kind(p)
        if kind != family:
            raise InputError(f"--looped {spec!r}: {path} is not a published {family} checkpoint (loopscope reads it "
                             f"as {kind or 'nothing it knows'}); give {family}=PATH of a {family} folder")
        models[family] = PretrainedModel(family, str(p.resolve()), reference)
    if "retrofit" not in models:
        models["retrofit"] = PretrainedModel("retrofit", STAND_IN, STAND_IN_BASE, stand_in=True)
    if any(m.stand_in for m in models.values()):
        references.setdefault(STAND_IN_BASE, STAND_IN_BASE)
    plan = PretrainedPlan(tuple(models[f] for f in FAMILIES if f in models), references)
    sizes = {k: v for k, v in dict(questions=questions, recurrences=recurrences,
                                   attention_recurrences=attention_recurrences,
                                   conditions_questions=conditions_questions,
                                   certificate_tokens=certificate_tokens).items() if v is not None}
    for k, v in sizes.items():
        if not 1 <= v <= (256 if "questions" in k else 10**6):
            raise InputError(f"--{k.replace('_', '-')} {v}: give " + ("1..256 (the fixed GSM8K test subset has "
                                                                      "256)" if "questions" in k else "at least 1"))
    if "recurrences" in sizes:
        from loopscope.dynamics.rule_dynamics import MIN_RECURRENCES

        if sizes["recurrences"] < MIN_RECURRENCES:  # the behaviour classifiers (App. C, co-occurrence) need them
            raise InputError(f"--recurrences {sizes['recurrences']}: give at least {MIN_RECURRENCES} (the per-token "
                             "behaviour classifiers need them; the paper uses 128)")
        sizes.setdefault("conditions_recurrences", sizes["recurrences"])
    from dataclasses import replace

    return replace(plan, stage_metrics=stage_metrics, dynamics_pages=dynamics_pages, **sizes)


def describe(plan: PretrainedPlan) -> dict:
    """The plan as plain data (the manifest and the report's run table)."""
    return {"looped": {m.family: m.spec + (" (builtin stand-in)" if m.stand_in else "") for m in plan.models},
            "feedforward": dict(plan.references), "questions": plan.questions, "recurrences": plan.recurrences,
            "attention_recurrences": plan.attention_recurrences, "conditions_questions": plan.conditions_questions,
            "conditions_recurrences": plan.conditions_recurrences}


def checkpoint_ids(plan: PretrainedPlan) -> dict[str, str]:
    """{"FAMILY" or "feedforward NAME": checkpoint_id} for every model of the plan (what the manifest records)."""
    out = {f"feedforward {name}": checkpoint_id(spec) for name, spec in plan.references.items()}
    return out | {m.family: checkpoint_id(m.spec) for m in plan.models}


def checkpoint_id(spec: str) -> str:
    """What a stage depends on: sha256 of the checkpoint folder's config and weight files (a checkpoint changed in
    place reruns its stages); for a builtin, `retrofit_study.model_id` (the shipped delta's hash) or its name.
    A file is hashed once per process while its size and modification time stay the same."""
    p = Path(spec)
    if not p.exists():
        from loopscope.experiments.retrofit_study import model_id

        return model_id(spec)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".json", ".safetensors", ".gguf"))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.name.encode())
        h.update(file_hash(str(f.resolve()), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


@functools.cache
def file_hash(path: str, size: int, mtime_ns: int) -> str:
    from loopscope.models.healed import file_sha256

    return file_sha256(Path(path))


# ---------------------------------------------------------------------------------------------- the stages

PROFILE_COLUMNS = ["segment", "recurrence", "layer", "depth", "relative_depth", "colsum_concentration_mean",
                   "massive_activation_ratio_mean"]


def profiles_by_prompt(loaded, prompts: list[str], recurrences: int, work: Path, progress: bool) -> pd.DataFrame:
    """Each prompt's stage profile alone (ColSum concentration, peak/median |x| per state): the units of the
    bootstrap over prompts. Columns: prompt, then `PROFILE_COLUMNS`."""
    import torch
    from tqdm.auto import tqdm

    from loopscope.capture.stream import StreamSettings, stream_prompts
    from loopscope.experiments.stage_tables import model_readout, stage_accumulators, stage_table_from

    R = recurrences if loaded.is_looped else 1
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc=f"{loaded.name}: stages prompt by prompt", disable=not progress)):
        with torch.inference_mode():
            tables, _ = stream_prompts(loaded, [prompt], stage_accumulators(model_readout(loaded)),
                                       StreamSettings(R, attention=True, batch_size=1, cache_dir=work / f"p{i:04d}",
                                                      progress=False, label="profile"))
        t = stage_table_from(tables)
        out.append(t[[c for c in PROFILE_COLUMNS if c in t]].assign(prompt=i))
    return pd.concat(out, ignore_index=True)[["prompt", *[c for c in PROFILE_COLUMNS if c in out[0]]]]


def alignment_by_prompt(looped: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per (prompt, recurrence): Pearson r of the looped model's ColSum profile of that pass with the reference's
    depth profile of the same prompt (`stages.alignment`)."""
    from loopscope.stages.alignment import alignment

    rows = []
    for prompt, part in looped.groupby("prompt", sort=True):
        ref = reference[reference["prompt"] == prompt]
        if ref.empty:
            continue
        a = alignment(part, ref, "colsum_concentration_mean")
        rows.append(a[["recurrence", "pearson"]].assign(prompt=int(prompt)))
    return pd.concat(rows, ignore_index=True)[["prompt", "recurrence", "pearson"]] if rows else \
        pd.DataFrame(columns=["prompt", "recurrence", "pearson"])


def reference_tables(spec: str, prompts: list[str], work: Path, progress: bool, precision) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.reproduce_stages import control_tables

    loaded = precision.load(spec)  # once per stage: a published checkpoint takes minutes to load
    tables = control_tables(spec, prompts, work / "all", progress, precision, loaded=loaded)
    tables["profiles_by_prompt"] = profiles_by_prompt(loaded, prompts, 1, work / "by_prompt", progress)
    return tables


def model_tables(m: PretrainedModel, prompts: list[str], reference: dict[str, pd.DataFrame] | None,
                 plan: PretrainedPlan, work: Path, progress: bool, precision) -> dict[str, pd.DataFrame]:
    """`analyze` of one pretrained looped model, plus its per-prompt units (see the module docstring)."""
    from loopscope.experiments.reproduce_stages import analyse_model
    from loopscope.experiments.retrofit_study import fixed_points_by_prompt

    control = reference["stages"] if reference is not None else pd.DataFrame()
    loaded = precision.load(m.spec)  # once per stage: a published checkpoint takes minutes to load
    tables = analyse_model(m.family, m.spec, prompts, control, plan, work / "analyze", progress, precision,
                           loaded=loaded)
    tables["fixed_points_by_prompt"] = fixed_points_by_prompt(tables["degeneracy"])
    b = tables["behaviour_dynamics"]
    tables["change_by_prompt"] = (b.groupby("batch")["final_relative_step"].mean().rename("change").reset_index()
                                  .rename(columns={"batch": "prompt"}))
    profiles = profiles_by_prompt(loaded, prompts, plan.attention_recurrences, work / "by_prompt", progress)
    tables["profiles_by_prompt"] = profiles
    if reference is not None:
        tables["alignment_by_prompt"] = alignment_by_prompt(profiles, reference["profiles_by_prompt"])
    return tables


def pretrained_stages(p, questions: list[str], data: str, plan: PretrainedPlan) -> dict:
    """Run (or load) every pretrained stage through `p.stage` (a `reproduce.Pipeline`)."""
    s = p.s
    prompts = questions[: plan.questions]
    ids = {spec: checkpoint_id(spec) for spec in [*plan.references.values(), *(m.spec for m in plan.models)]}
    references = {}
    for name, spec in plan.references.items():
        stage = f"pretrained-reference-{name}"
        work = p.cache.dir(stage) / "work"
        references[name] = p.stage(stage, {"model": ids[spec], "prompts": plan.questions},
                                   lambda spec=spec, work=work: reference_tables(spec, prompts, work, s.progress,
                                                                                 s.precision), scratch=work)
    models = {}
    for m in plan.models:
        stage = f"pretrained-{m.family}"
        work = p.cache.dir(stage) / "work"
        ref = references.get(m.reference) if m.reference else None
        params = {"model": ids[m.spec], "prompts": plan.questions, "recurrences": plan.recurrences,
                  "attention_recurrences": plan.attention_recurrences, "certificate_tokens": plan.certificate_tokens,
                  "reference": ids[plan.references[m.reference]] if ref is not None else None}
        models[m.family] = p.stage(stage, params, lambda m=m, ref=ref, work=work: model_tables(
            m, prompts, ref, plan, work, s.progress, s.precision), scratch=work)
    result = {"plan": plan, "references": references, "models": models}
    retrofit = plan.model("retrofit")
    if retrofit is not None:  # Fig. 41: zero the MLP where its massive activations begin, at every pass
        from loopscope.experiments.reproduce_stages import ablation_stage

        result["ablation"] = p.stage(
            "pretrained-ablate-retrofit", {"model": ids[retrofit.spec], "prompts": plan.questions,
                                           "R": plan.attention_recurrences},
            lambda: ablation_stage("retrofit", retrofit.spec, prompts, plan.attention_recurrences, s.progress,
                                   s.precision))
    huginn = plan.model("huginn")
    if huginn is not None:
        from loopscope.experiments.conditions import run_conditions
        from loopscope.experiments.reproduce import conditions_tables

        run = p.cache.dir("pretrained-conditions") / "run"
        result["conditions"] = p.stage(
            "pretrained-conditions", {"model": ids[huginn.spec], "questions": plan.conditions_questions,
                                      "recurrences": plan.conditions_recurrences},
            lambda: conditions_tables(run_conditions(huginn.spec, run, data=data,
                                                     questions=plan.conditions_questions,
                                                     recurrences=plan.conditions_recurrences, progress=s.progress,
                                                     precision=s.precision)),
            scratch=run / "cache")
    return result


def n_stages(plan: PretrainedPlan) -> int:
    return (len(plan.references) + len(plan.models) + (plan.model("huginn") is not None)
            + (plan.model("retrofit") is not None))


# ---------------------------------------------------------------------------------------------- measurements

def pretrained_measurements(r: dict) -> dict[str, pd.DataFrame]:
    """The tables `experiments.pretrained_claims` reads (one row per unit; `family` names the model's part):

    pretrained_models            family, model (spec), stand_in, reference, recurrences, trained_recurrences,
                                 fraction_orbit, fraction_slider, orbit_slider_cooccurrence, massive_ratio
    pretrained_fixed_points      family, prompt, tokens, converged, distinct
    pretrained_alignment         family, reference, prompt, recurrence, pearson (ColSum, per pass)
    pretrained_change            family, prompt, change (last block layer's relative step at R, mean over tokens)
    pretrained_massive           family, prompt, massive_ratio (largest peak/median |x| over the prompt's states)
    pretrained_ablation          the Fig. 41 ablation on the retrofit (`intervene.massive_ablation_tables` summary)
    pretrained_conditions, pretrained_conditions_by_question   `run_conditions` on Huginn
    """
    plan: PretrainedPlan = r["plan"]
    rows, fixed, align, change, massive = [], [], [], [], []
    for m in plan.models:
        t = r["models"].get(m.family)
        if t is None:
            continue
        summary = t["summary"].iloc[0]
        rows.append({"family": m.family, "model": m.spec, "stand_in": m.stand_in, "reference": m.reference or "",
                     "recurrences": int(summary["recurrences"]),
                     "trained_recurrences": int(summary["trained_recurrences"]),
                     **{k: summary[k] for k in ("fraction_orbit", "fraction_slider", "orbit_slider_cooccurrence",
                                                "massive_ratio")}})
        fixed.append(t["fixed_points_by_prompt"].rename(columns={"batch": "prompt"}).assign(family=m.family))
        change.append(t["change_by_prompt"].assign(family=m.family))
        prof = t["profiles_by_prompt"]
        massive.append(prof.groupby("prompt")["massive_activation_ratio_mean"].max().rename("massive_ratio")
                       .reset_index().assign(family=m.family))
        if "alignment_by_prompt" in t:
            align.append(t["alignment_by_prompt"].assign(family=m.family, reference=m.reference))
    first = ["family"]

    def frame(parts: list[pd.DataFrame], extra: list[str] = ()) -> pd.DataFrame:
        if not parts:
            return pd.DataFrame()
        f = pd.concat(parts, ignore_index=True)
        return f[[*first, *extra, *[c for c in f.columns if c not in (*first, *extra)]]]

    out = {"pretrained_models": pd.DataFrame(rows), "pretrained_fixed_points": frame(fixed),
           "pretrained_alignment": frame(align, ["reference"]), "pretrained_change": frame(change),
           "pretrained_massive": frame(massive)}
    if "ablation" in r:
        out["pretrained_ablation"] = r["ablation"]["summary"]
    if "conditions" in r:
        out["pretrained_conditions"] = r["conditions"]["conditions"]
        out["pretrained_conditions_by_question"] = r["conditions"]["conditions_by_question"]
    return out
