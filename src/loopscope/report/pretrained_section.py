"""Pretrained-checkpoints section: what `experiments.pretrained_study` measured on the checkpoints a user gave
(Ouro, Huginn-0125, a retrofitted model, a feedforward reference). Writes tables only; every table here is a unit
table the pretrained claim rows are recomputed from."""

from __future__ import annotations

import pandas as pd

from loopscope.report.document import Report

TABLES = (
    ("pretrained_models", "One row per pretrained looped model: its part (family), checkpoint, whether it is the "
     "builtin stand-in, the feedforward reference its stages are aligned with, R, its training recurrences, "
     "orbit/slider shares and co-occurrences, the largest peak/median |x|."),
    ("pretrained_fixed_points", "Per model and prompt: tokens, tokens whose last block layer reached a fixed point "
     "(converged), of them with distinct per-layer fixed points (distinct): the units of the Fig. 4 rows."),
    ("pretrained_alignment", "Per model, prompt and pass: Pearson r of the pass's ColSum profile with the "
     "feedforward reference's depth profile of the same prompt: the units of the Fig. 8 / 36 / 40 rows."),
    ("pretrained_change", "Per model and prompt: the last block layer's relative step at the last recurrence, mean "
     "over the prompt's tokens: the units of the §6.2 extrapolation rows."),
    ("pretrained_massive", "Per model and prompt: the largest peak/median |x| over the prompt's states (Fig. 9)."),
    ("pretrained_ablation", "Fig. 41 on the retrofit: the MLP of the layer where its massive activations begin, "
     "zeroed at every pass; the stage metrics' mean after / before, peak/median |x| before and after, KL."),
    ("pretrained_conditions", "App. C on Huginn-0125: token shares per behaviour under each system-prompt "
     "condition, per classifier."),
    ("pretrained_conditions_by_question", "App. C on Huginn-0125: per condition, classifier and question, question "
     "tokens and non-fixed-point tokens (the units of the paired bootstrap)."),
)


def add_pretrained_section(report: Report, measured: dict[str, pd.DataFrame], run: dict) -> None:
    """`measured`: `pretrained_study.pretrained_measurements`; `run`: the plan as plain data (`describe`)."""
    sec = report.section(
        "Pretrained checkpoints",
        "The paper's pretrained models, as given on the command line ("
        + "; ".join(f"{family}: {spec}" for family, spec in run["looped"].items())
        + "; feedforward reference: " + (", ".join(f"{k}: {v}" for k, v in run["feedforward"].items()) or "none")
        + f"), on {run['questions']} GSM8K test questions at R = {run['recurrences']} (stage profiles at "
        f"{run['attention_recurrences']} recurrences). Every interval is a 95 % bootstrap over prompts; a family "
        "not given is not measured, and no builtin or toy model stands in for one (smollm2-looped only for the "
        "retrofit, and the rows say so).",
    )
    for name, caption in TABLES:
        frame = measured.get(name)
        if frame is not None and len(frame):
            report.table(sec, frame, name, caption, max_rows=40)
