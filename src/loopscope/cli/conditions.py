"""`loopscope conditions`: orbit / slider rates of GSM8K questions under system-prompt conditions."""

from __future__ import annotations

from pathlib import Path

import typer

from loopscope.cli.common import (
    apply_threads,
    device_option,
    dtype_option,
    overwrite_option,
    precision,
    state_dtype_option,
    threads_option,
)


def register(app: typer.Typer) -> None:
    @app.command("conditions")
    def conditions(
        model: str = typer.Option("default", "--model", "-m", help="Looped model: builtin name or checkpoint path."),
        out: Path = typer.Option(Path("reports/conditions"), "--out", "-o", help="Report directory (created)."),
        data: str = typer.Option(None, "--data", help="GSM8K test.jsonl, or the directory holding it. Without it "
                                 "the Hugging Face `datasets` hub is tried (network and `pip install datasets`)."),
        questions: int = typer.Option(16, "--questions", help="First N questions of the fixed GSM8K test subset."),
        recurrences: int = typer.Option(64, "--recurrences", "-r", help="Recurrences each token's trajectory is "
                                        "classified over (the paper uses 128)."),
        condition: list[str] = typer.Option(None, "--condition", "-c", help="A condition to run (repeatable): none, "
                                            "long-persona, long-persona-padded, short-math. Default: all four."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """How often do tokens orbit or slide instead of settling, with and without a system prompt?

        **What it does.** Runs GSM8K test questions through the model under each system-prompt condition (no
        system prompt; a long persona prompt; the same number of pad tokens; a short maths prompt — the persona and
        maths texts are reconstructions, the paper does not print them) and classifies every question token's
        trajectory at the last block layer as fixed point, orbit, slider, divergent or unknown, with the dynamics
        classifier and with the reconstructed heuristic of Blayney et al. App. C (τ = 0.05, ρ = 0.9).

        **Output.** `OUT/index.html`, `OUT/figures/conditions_*.png` (percent of question tokens per non-fixed-point
        behaviour, per condition), `OUT/tables/conditions.csv` (question tokens) and
        `OUT/tables/conditions_all_tokens.csv` (every token, system prompt included).

        **Resuming.** Each finished condition's per-token labels are kept in `OUT/cache/conditions`.

        **Example.** `loopscope conditions --model default --data ../shared/data/gsm8k --questions 16 --out
        reports/conditions`
        """
        apply_threads(threads)
        from loopscope.experiments.conditions import run_conditions

        run_conditions(model, out, data=data, questions=questions, recurrences=recurrences,
                       conditions=list(condition) if condition else None, progress=not quiet, overwrite=overwrite,
                       precision=precision(device, dtype, state_dtype))
