"""System-prompt conditions section: behaviour rates per condition and classifier (Blayney et al. App. C.1)."""

from __future__ import annotations

import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv

NON_FIXED = ["orbit", "slider", "divergent", "unknown"]


def add_conditions_section(report: Report, table: pd.DataFrame, by_question: pd.DataFrame | None = None) -> None:
    """Add per-condition behaviour rates (`run_conditions`'s table) to `report`: one grouped bar figure per
    classifier, in percent of question tokens, and the tables (question tokens; all tokens if attached)."""
    out = report.out_dir
    sec = report.section(
        "Orbits and sliders under system prompts",
        "Blayney et al. App. C.1: the share of tokens that do not settle at a fixed point, per system-prompt "
        "condition, at the last block layer, by the dynamics classifier and by the reconstructed App. C heuristic "
        "(τ = 0.05, ρ = 0.9). Counted over question tokens only; 'reconstructed' marks conditions whose prompt "
        "text the paper does not print. The paper reports ≈ 0.02% non-fixed-point tokens without a system prompt "
        "and 0.14% with the Long Persona (Huginn-0125 / retrofitted Llama at 128 recurrences).",
    )
    csv = save_csv(table, out, "conditions")
    by_question = table.attrs.get("by_question") if by_question is None else by_question  # saved as a CSV only
    csvs = [csv] if by_question is None else [csv, save_csv(by_question, out, "conditions_by_question")]
    for method, part in table.groupby("method", sort=False):
        bars = part.set_index("condition")[NON_FIXED] * 100
        png = figures.grouped_bars(bars.round(3), out, f"conditions_{method}",
                                   title=f"non-fixed-point behaviours per condition ({method} classifier)",
                                   ylabel="% of question tokens")
        n = int(part["n"].min())
        sec.items.append(Figure(png, f"Percent of question tokens per non-fixed-point behaviour, per system-prompt "
                                     f"condition ({method} classifier); the rest are fixed points. {n} question "
                                     f"tokens per condition: one token is {100 / n:.2g}%.", csvs))
    report.table(sec, table, "conditions_table", "Fractions of question tokens per behaviour (rows sum to 1).")
    every = table.attrs.get("all_tokens")
    if every is not None:
        report.table(sec, every, "conditions_all_tokens", "The same over every real token (BOS and system prompt "
                     "included).")
