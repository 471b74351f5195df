"""`loopscope reproduce` sections: the paper's claims with our verdicts (first), and the training runs.

Draws and writes only: the verdicts come from `experiments.claims`, the curves from the training runs' tables.
"""

from __future__ import annotations

import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv


def add_claims_section(report: Report, claims: pd.DataFrame, models: pd.DataFrame, thresholds: pd.DataFrame,
                       timings: pd.DataFrame, run: dict[str, object] | None = None,
                       checks: pd.DataFrame | None = None, verdict_counts: dict[str, int] | None = None) -> None:
    """The claims table (one line per claim: verdict and the numbers behind it), then what it was computed from.
    `verdict_counts`: claims per verdict (`experiments.claims.verdict_counts`)."""
    verdict_counts = verdict_counts or {}
    counts = verdict_counts
    sec = report.section(
        "The paper's claims against this run",
        "Each claim of Blayney et al. (2026) in one line, with a verdict computed by an explicit rule "
        "(loopscope.experiments.claims): holds / differs when the effect's 95 % interval lies on one side of a "
        "threshold fixed before the run, inconclusive when it straddles it, not measurable here, or effect only "
        "where no threshold could be fixed before seeing data; with the effect, its interval and the numbers used. "
        f"This run: {counts.get('holds', 0)} hold, {counts.get('differs', 0)} differ, "
        f"{counts.get('inconclusive', 0)} inconclusive, "
        f"{counts.get('not measurable here', 0)} not measurable here, {counts.get('effect only', 0)} effect only. "
        "Our models are small and briefly trained on a "
        "CPU, so a verdict says what this run shows, not whether the paper is right.",
    )
    report.table(sec, claims, "claims", "Claims (id, where the paper makes it, the claim), verdict, evidence (the "
                 "rule's numbers) and the models it was measured on.", max_rows=200, text=True)
    if checks is not None and len(checks):
        report.table(sec, checks, "checks", "Sanity checks, apart from the claims: a theorem checked numerically "
                     "(the Prop. 4.2 bound) and an implication any deterministic recurrence nearly guarantees "
                     "(Prop. 4.1). They fail only if the code or the arithmetic is wrong.", max_rows=20, text=True)
    if run:
        report.table(sec, pd.DataFrame({"setting": list(run), "value": [str(v) for v in run.values()]}), "run",
                     "This run.", text=True)
    report.table(sec, models, "claims_models", "Per analysed looped model, the numbers the claims read (definitions "
                 "in loopscope.experiments.claims and experiments.reproduce.model_summary).", max_rows=50)
    report.table(sec, thresholds, "claims_thresholds", "Thresholds of the rules: value, reason, source, and when each "
                 "was fixed.", max_rows=50, text=True)
    report.table(sec, timings, "stage_timings", "Pipeline stages: wall time in seconds when each ran (a cached stage "
                 "keeps the time of the run that computed it).", max_rows=100)


def add_training_section(report: Report, history: dict[str, pd.DataFrame], evals: dict[str, pd.DataFrame],
                         metrics: pd.DataFrame) -> None:
    """Loss curves of every model trained here (training loss per step, held-out loss per evaluation) and their
    final numbers."""
    out = report.out_dir
    sec = report.section(
        "Training from scratch",
        "Blayney et al. §6.3 train (2, k⊗4, 2) looped models and a depth-12 feedforward control with cross-entropy "
        "on the final state only, constant 4 recurrences, pre-norm. Ours are the same shapes at width 128, trained "
        "on GSM8K train for the wall-time budget shown (the paper: width 512, 3.7B tokens).",
    )
    hist = pd.concat([h.assign(model=name) for name, h in history.items()], ignore_index=True)
    csv = save_csv(hist, out, "training_history")
    png = figures.line_panels(hist, "step", [("loss_mean10", "training loss (nats, mean of 10 steps)")], "model", out,
                              "training_loss", title="Training loss", series_label="")
    sec.items.append(Figure(png, "Next-token loss on the training batches, per step (running mean over 10 steps).",
                            [csv]))
    ev = pd.concat([e.assign(model=name) for name, e in evals.items()], ignore_index=True)
    csv = save_csv(ev, out, "training_eval")
    png = figures.line_panels(ev, "step", [("loss", "held-out loss (nats)")], "model", out, "training_heldout",
                              title="Held-out loss during training", series_label="")
    sec.items.append(Figure(png, "Held-out GSM8K loss on a fixed slice of the test subset, at every evaluation "
                                 "(step 0 = untrained).", [csv]))
    report.table(sec, metrics, "training_metrics", "Final numbers per model: held-out loss on the whole fixed "
                 "256-question GSM8K test subset, trained and untrained.")
