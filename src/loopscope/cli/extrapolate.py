"""`loopscope extrapolate`: trained looped models at R = 1 … ≥ 8× their training recurrences."""

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


def parse_ints(text: str | None, option: str) -> list[int] | None:
    """"1,2,4,8" → [1, 2, 4, 8]; None stays None; anything else is an InputError naming the option."""
    from loopscope.cli.common import parse_int_list

    return None if text is None else parse_int_list(text, option, minimum=1)


def register(app: typer.Typer) -> None:
    @app.command("extrapolate")
    def extrapolate(
        model: list[str] = typer.Option(["default"], "--model", "-m", help="Trained looped model: builtin name or "
                                        "checkpoint directory. Repeat for several models."),
        out: Path = typer.Option(Path("reports/extrapolate"), "--out", "-o", help="Report directory (created). "
                                 "Holds index.html, figures/*.png, tables/*.csv and cache/ (finished rows)."),
        data: str = typer.Option(None, "--data", help="GSM8K test.jsonl, or the directory holding it. Without it "
                                 "the Hugging Face `datasets` hub is tried (network and `pip install datasets`)."),
        control: str = typer.Option(None, "--control", help="Feedforward model for stage alignment (e.g. smollm2 "
                                    "or a trained feedforward-12 checkpoint). Without it alignment is skipped."),
        recurrences: str = typer.Option(None, "--recurrences", "-r", help="Comma-separated grid of R. Default: "
                                        "1, 2, 3, 4, 6, 8, 12, … up to --max-factor × the training R."),
        max_factor: int = typer.Option(8, "--max-factor", help="The default grid ends at this multiple of the "
                                       "training recurrences."),
        loss_questions: int = typer.Option(256, "--loss-questions", help="Questions of the fixed 256-question "
                                           "GSM8K test subset whose worked answers give the held-out loss."),
        accuracy_questions: int = typer.Option(16, "--accuracy-questions", help="Questions greedy-decoded for "
                                               "exact match at every R (0 skips; about 2 s each at R = 4 and "
                                               "10 s at R = 32 for the default model on one CPU core)."),
        dynamics_prompts: int = typer.Option(16, "--dynamics-prompts", help="Questions captured for fixed-point "
                                             "distance, behaviours and alignment."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Greedy decoding budget per question."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Run trained looped models at more (and fewer) recurrences than they were trained with.

        **What it does.** For every model and every R of the grid: the held-out next-token loss on the fixed GSM8K
        test subset, exact-match accuracy of greedy decoding, the relative distance of the last block layer's
        state after R recurrences to its state at the largest R (an approximate fixed point), the relative change
        of that state at recurrence R, the fraction of tokens per behaviour (fixed point, orbit, slider, divergent,
        unknown; dynamics classifier, R ≥ 4), and, with `--control`, how closely the last pass's stage profile
        (ColSum, sink rate, mixing, entropy, norms, logit lens) correlates with the feedforward control's
        (Blayney et al. §6.2: stages and accuracy under extrapolation track fixed-point convergence).

        **Output.** `OUT/index.html`, `OUT/figures/extrapolate_*.png` (metric against R, the training R dotted),
        `OUT/tables/extrapolate_per_r.csv` (one row per model and R) and the alignment tables.

        **Resuming.** Each finished (model, R) row is kept in `OUT/cache/extrapolate`; rerunning the same command
        after an interruption recomputes only the missing rows.

        **Example.** `loopscope extrapolate --model default --data ../shared/data/gsm8k --control smollm2
        --accuracy-questions 4 --out reports/extrapolate`
        """
        apply_threads(threads)
        from loopscope.experiments.extrapolate import ExtrapolateSettings, run_extrapolate

        run_extrapolate(ExtrapolateSettings(
            models=list(model), out=out, control=control, data=data,
            recurrences=parse_ints(recurrences, "--recurrences"), max_factor=max_factor,
            loss_questions=loss_questions, accuracy_questions=accuracy_questions, dynamics_prompts=dynamics_prompts,
            max_new_tokens=max_new_tokens, progress=not quiet, overwrite=overwrite,
            precision=precision(device, dtype, state_dtype),
        ))
