"""`loopscope reproduce`'s report: the claims (first), the training runs, then every stage's sections, drawn from
the finished stages' tables by the section builders of `loopscope.report`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from loopscope.experiments.claims import evaluate_checks, evaluate_claims, thresholds_table, verdict_counts
from loopscope.experiments.reproduce_stages import measurements

if TYPE_CHECKING:
    from loopscope.experiments.reproduce import Pipeline


def write_report(p: Pipeline, results: dict) -> Path:
    """OUT/index.html from the finished stages: claims and checks first, then training, models, ablation, grid,
    extrapolation, conditions and the retrofit; returns its path."""
    from loopscope.experiments.grid import grid_views
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
    if plan.pretrained is not None:
        return pretrained_report(p, results, m, claims[claims["id"].str.startswith("pretrained-")]
                                 .reset_index(drop=True))
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
                       run, checks, verdict_counts(claims))
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
        add_grid_section(report, **grid_views(g["cells"], g["curves"], g.get("certificates")))
    if "extrapolate" in results:
        from loopscope.experiments.extrapolate import add_extrapolate_section

        add_extrapolate_section(report, results["extrapolate"])
    if "conditions" in results:
        from loopscope.experiments.conditions import add_conditions_section

        add_conditions_section(report, results["conditions"]["conditions"],
                               results["conditions"].get("conditions_by_question"))
    return report.write()


def pretrained_report(p: Pipeline, results: dict, m: dict, claims: pd.DataFrame) -> Path:
    """The `--pretrained` report: the pretrained claims, the unit tables they are judged from, then each model's
    dynamics and stages (against its feedforward reference)."""
    from loopscope.experiments.pretrained_study import describe
    from loopscope.experiments.stage_tables import STAGE_METRICS
    from loopscope.report import Report
    from loopscope.report.claims_section import add_claims_section
    from loopscope.report.dynamics_section import add_dynamics_sections
    from loopscope.report.pretrained_section import add_pretrained_section
    from loopscope.report.stages_section import add_stages_section

    s, plan = p.s, p.plan.pretrained
    d = describe(plan)
    run = {"mode": "pretrained (the checkpoints given on the command line; no training, no grid)",
           "looped": "; ".join(f"{k}: {v}" for k, v in d["looped"].items()),
           "feedforward reference": "; ".join(f"{k}: {v}" for k, v in d["feedforward"].items()) or "none given",
           "data": f"GSM8K from {s.data}; the first {plan.questions} questions of the fixed 256-question test subset",
           "recurrences": f"{plan.recurrences} for dynamics, {plan.attention_recurrences} for the stage profiles; "
                          f"App. C on Huginn: {plan.conditions_questions} questions at R = "
                          f"{plan.conditions_recurrences}",
           "wall time": f"{results['wall_s']:.0f} s before the report in this invocation"}
    report = Report("loopscope reproduce --pretrained — Blayney et al. (2026) on published looped checkpoints",
                    s.out)
    add_claims_section(report, claims, pd.DataFrame(), thresholds_table(p.plan.thresholds), pd.DataFrame(p.timings),
                       run, None, verdict_counts(claims))
    add_pretrained_section(report, m, d)
    r = results["pretrained"]
    metrics = {k: v for k, v in STAGE_METRICS.items() if plan.stage_metrics is None or k in plan.stage_metrics}
    for model in plan.models:
        t = r["models"][model.family]
        ref = r["references"].get(model.reference) if model.reference else None
        child = report.child(f"models/{model.family}")
        if plan.dynamics_pages:
            add_dynamics_sections(child, t, plan.recurrences)
        add_stages_section(child, t["stages"], metrics, model_name=model.family,
                           feedforward=ref["stages"] if ref is not None else None,
                           ff_name=f"{model.reference} (feedforward reference)", alignment=t.get("alignment"),
                           prop42=t.get("prop42"), neurons=t.get("neurons"))
        report.adopt(child, model.family)
    return report.write()
