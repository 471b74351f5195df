"""`loopscope compare`: stages of a looped model against a feedforward model."""

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
    @app.command("compare")
    def compare(
        looped: str = typer.Argument(..., help="Looped model: builtin name or checkpoint path."),
        feedforward: str = typer.Argument(..., help="Feedforward model: builtin (e.g. smollm2), HF directory or "
                                          ".gguf."),
        prompts: str = typer.Option("gsm-symbolic", "--prompts", "-p", help="Builtin prompt set or file."),
        out: Path = typer.Option(Path("reports/compare"), "--out", "-o", help="Report directory (created)."),
        recurrences: int = typer.Option(8, "--recurrences", "-r", help="Recurrences of the looped run."),
        max_prompts: int = typer.Option(None, "--max-prompts", help="Use only the first N prompts."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Lay a looped model's stages of inference over a feedforward model's, and score the match.

        **What it does.** Captures both models on the same prompts with attention (the looped one at
        `--recurrences`), computes every stage metric per state (ColSum concentration, sink rate, mixing score,
        attention to the previous 5 tokens, residual matrix entropy, token norms and massive activations,
        logit-lens entropy and rank), and plots each in three views: along realized depth, one line per
        recurrence on relative depth with the feedforward profile dashed over it, and one line per block layer.

        **The number.** `tables/alignment.csv`: for every metric and recurrence, the Pearson and Spearman
        correlation and the RMSE between that recurrence's profile and the feedforward profile, resampled to a
        common relative-depth grid.

        **Example.** `loopscope compare default smollm2 --max-prompts 8 --out reports/compare`
        """
        apply_threads(threads)
        from loopscope.experiments.compare import CompareSettings, run_compare

        index = run_compare(CompareSettings(looped=looped, feedforward=feedforward, prompts=prompts, out=out,
                                            recurrences=recurrences, max_prompts=max_prompts,
                                            batch_size=batch_size, progress=not quiet, overwrite=overwrite,
                                            precision=precision(device, dtype, state_dtype)))
        typer.echo(f"wrote {index}")
