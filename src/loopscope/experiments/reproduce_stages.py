"""The bodies of `loopscope reproduce`'s stages: what each stage runs and the tables it returns.

`experiments.reproduce` decides which stages run, in which order, and resumes them (`Pipeline.stage`); each
function here runs one stage from its inputs and returns plain tables, so any one can be rerun or tested alone.
`measurements` gathers the finished stages' tables into what `experiments.claims` judges.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from loopscope.dynamics.attention_stability import attention_self_match, attention_shrink
from loopscope.models.device import Precision
from loopscope.stages.alignment import colsum_alignment
from loopscope.stages.repetition import stage_repeat_error

if TYPE_CHECKING:  # the stage runner and the plan are `experiments.reproduce`'s; only their types are read here
    from loopscope.experiments.reproduce import Pipeline, StudyPlan


def train_stage(p: Pipeline, preset: str, seed: int, name: str) -> dict[str, pd.DataFrame]:
    """Train `preset` with `seed` (weights, document shuffle, batch order) into OUT/runs/<name>."""
    from loopscope.experiments.train import TrainSettings, train

    settings = TrainSettings(preset=preset, seed=seed, data=p.s.data, threads=p.s.threads, **p.plan.train)
    run_dir = p.s.out / "runs" / name

    def compute() -> dict[str, pd.DataFrame]:
        from loopscope.data.tokenizer import load_tokenizer
        from loopscope.experiments.train import build_data

        tokenizer = load_tokenizer()
        if p.train_data is None or p.train_data_seed != seed:  # shared by the presets of one seed (the corpus
            p.train_data = build_data(settings, tokenizer)         # shuffle follows the seed)
            p.train_data_seed = seed
        metrics = train(settings, run_dir, data=p.train_data, tokenizer=tokenizer, progress=p.s.progress)
        return training_tables(run_dir, metrics)

    return p.stage(f"train-{name}", settings.to_dict(), compute)


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


def control_tables(spec: str, prompts: list[str], work: Path, progress: bool, precision: Precision,
                   loaded=None) -> dict[str, pd.DataFrame]:
    """The feedforward model's stage profile (one pass, with attention) and neuron fractions; `loaded`: the model
    already loaded from `spec` (else it is loaded here)."""
    from loopscope.capture.stream import StreamSettings, stream_prompts
    from loopscope.experiments.stage_tables import (
        model_neuron_fractions,
        model_readout,
        stage_accumulators,
        stage_table_from,
    )

    loaded = loaded or precision.load(spec)
    with torch.inference_mode():
        tables, _ = stream_prompts(loaded, prompts, stage_accumulators(model_readout(loaded)),
                                   StreamSettings(1, attention=True, batch_size=8, cache_dir=work, progress=progress,
                                                  label="control"))
    return {"stages": stage_table_from(tables), "neurons": model_neuron_fractions(loaded)}


def analyse_model(name: str, spec: str, prompts: list[str], control_stages: pd.DataFrame, plan: StudyPlan, work: Path,
                  progress: bool, precision: Precision, seed: int | None = None, loaded=None
                  ) -> dict[str, pd.DataFrame]:
    """Everything `loopscope analyze --feedforward` computes for one model, plus its one-row summary; `loaded`: the
    model already loaded from `spec` (else it is loaded here)."""
    from loopscope.experiments.analyze import AnalyzeSettings, analyse
    from loopscope.experiments.stage_tables import alignment_table, model_neuron_fractions
    loaded = loaded or precision.load(spec)
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
    tables["summary"] = pd.DataFrame([model_summary(name, loaded.model.cfg, plan.recurrences, tables, seed)])
    return tables


def model_summary(name: str, cfg, recurrences: int, t: dict[str, pd.DataFrame], seed: int | None = None) -> dict:
    """The one row per model that the claims read (column meanings in `experiments.claims`); `name` is the
    model's name in this study (preset and seed, or a builtin's name), base/variant come from its preset; `seed`
    the training seed (None, stored as NaN, for a builtin trained elsewhere)."""
    preset = cfg.extra.get("preset", cfg.name) if cfg.extra else cfg.name
    base, _, variant = preset.partition("+")
    check = t["cyclic_fixed_point_check"]
    deg = t["degeneracy_summary"].iloc[0]
    behaviour = t["behaviour_dynamics"]["behaviour"].value_counts(normalize=True)
    co = t["cooccurrence"]
    prop42 = t.get("prop42")
    return {
        "model": name, "preset": preset, "seed": math.nan if seed is None else seed, "base": base, "variant": variant,
        "norm": cfg.norm, "injection": cfg.injection,
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
                                                                  "unknown", "at_floor")},
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


ABLATION_REFERENCE = "smollm2"  # feedforward, real weights: the massive activations the looped models may lack


def ablation_models(analyses: dict[str, dict[str, pd.DataFrame]], plan: StudyPlan) -> list[str]:
    """The pre-norm model (trained here) with the largest massive-activation ratio, then the reference."""
    rows = pd.concat([t["summary"] for t in analyses.values()], ignore_index=True)
    trained = {plan.name(preset, seed) for preset in plan.looped for seed in plan.seeds}
    pre = rows[(rows["norm"] == "pre") & rows["model"].isin(trained)].dropna(subset=["massive_ratio"])
    chosen = [str(pre.loc[pre["massive_ratio"].idxmax(), "model"])] if len(pre) else []
    return [*chosen, ABLATION_REFERENCE]


def ablation_stage(name: str, spec: str, prompts: list[str], attention_recurrences: int,
                   progress: bool, precision: Precision) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.intervene import massive_ablation_tables

    loaded = precision.load(spec)
    R = attention_recurrences if loaded.is_looped else 1
    return massive_ablation_tables(loaded, name, prompts, R, progress=progress)


def grid_tables(plan: StudyPlan, out: Path, progress: bool, precision: Precision) -> dict[str, pd.DataFrame]:
    from loopscope.experiments.grid import (
        GridSettings,
        certificate_agreement,
        read_certificates,
        run_grid,
        verdict_table,
    )

    settings = GridSettings(out=out, progress=progress, precision=precision, **plan.grid)
    cells, curves = run_grid(settings)
    cert = read_certificates(settings)
    return {"cells": cells, "curves": curves, "verdicts": verdict_table(cells), "certificates": cert,
            "certificate_agreement": certificate_agreement(cert)}


def measurements(results: dict) -> dict[str, pd.DataFrame]:
    """The tables the claims read (see `experiments.claims`)."""
    m = {"models": pd.concat([a["summary"] for a in results["analyses"].values()], ignore_index=True)} \
        if results["analyses"] else {}
    if results.get("pretrained"):
        from loopscope.experiments.pretrained_study import pretrained_measurements

        m.update(pretrained_measurements(results["pretrained"]))
    if results.get("retrofit"):
        from loopscope.experiments.retrofit_study import retrofit_measurements

        m.update(retrofit_measurements(results["retrofit"]))
    if results.get("ablation"):
        m["massive_ablation"] = pd.concat([t["summary"] for t in results["ablation"].values()], ignore_index=True)
    if "grid" in results:
        m["grid_cells"], m["grid_verdicts"] = results["grid"]["cells"], results["grid"]["verdicts"]
    if "extrapolate" in results:
        m["extrapolate"] = results["extrapolate"]["per_r"]
        for unit in ("per_text", "per_prompt"):  # the units of the extrapolation rows' intervals
            if unit in results["extrapolate"]:
                m[f"extrapolate_{unit}"] = results["extrapolate"][unit]
    if "conditions" in results:
        m["conditions"] = results["conditions"]["conditions"]
        if "conditions_by_question" in results["conditions"]:
            m["conditions_by_question"] = results["conditions"]["conditions_by_question"]
    return m
