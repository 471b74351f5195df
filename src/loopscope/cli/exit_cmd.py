"""`loopscope exit`: the certified early exit against Huginn's KL rule and fixed R (compute against quality)."""

from __future__ import annotations

from pathlib import Path

import typer

from loopscope.cli.common import (
    apply_threads,
    device_option,
    dtype_option,
    overwrite_option,
    parse_float_list,
    parse_int_list,
    parse_word_list,
    precision,
    state_dtype_option,
    threads_option,
)


def register(app: typer.Typer) -> None:
    @app.command("exit")
    def exit_command(
        model: list[str] = typer.Option(["default"], "--model", "-m", help="Looped model: builtin name, checkpoint "
                                        "directory, or preset:NAME for an untrained toy preset (e.g. "
                                        "preset:looped-4+inject+sandwich). Repeat for several models."),
        prompts: str = typer.Option("gsm-symbolic", "--prompts", "-p", help="Builtin prompt set or a file; loss and "
                                    "accuracy are next-token predictions on these texts."),
        out: Path = typer.Option(Path("reports/exit"), "--out", "-o", help="Report directory (created): "
                                 "index.html, figures/ (PNG), tables/ (CSV), manifest.json."),
        recurrences: int = typer.Option(32, "--recurrences", "-r", help="R_max: every rule is compared with the "
                                        "prediction after R_max recurrences."),
        fixed: str = typer.Option(None, "--fixed", help="Comma-separated fixed R rows (default 1, 2, 4, … R_max)."),
        eps: str = typer.Option("1,0.1", "--eps", help="Bounds ε on the certified logit change (comma-separated)."),
        huginn_kl: str = typer.Option("5e-4", "--huginn-kl", help="Thresholds of Huginn's rule, KL between "
                                      "successive next-token distributions (the paper's 5e-4)."),
        rate: str = typer.Option("certificate,measured,max", "--rate", help="Sources of the contraction rate ρ of "
                                 "the certified rows: certificate, measured, max (comma-separated)."),
        certificate: bool = typer.Option(True, "--certificate/--no-certificate", help="Run the stability "
                                         "certificate per prompt (Arnoldi on the block's Jacobian at R_max)."),
        max_prompts: int = typer.Option(8, "--max-prompts", help="Use only the first N prompts."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Stop the recurrence early, with and without a certificate, and measure what it costs.

        **SYNOPSIS.** `loopscope exit [--model M]… [--recurrences R_MAX] [--eps E,…] [--rate SRC,…] --out DIR`

        **DESCRIPTION.** Runs each prompt once for R_max recurrences and reads, after every recurrence, every
        position's next-token distribution through the model's exit path (coda, final norm, W_U). Each rule picks,
        per position, the recurrence at which to read it (the causal prefix recurs together): fixed R; Huginn's
        rule (stop when KL(p_t ‖ p_{t−1}) < 5e-4, Geiping et al. 2025); and the certified exit. For a contraction
        with rate ρ < 1, ‖s_t − s*‖ ≤ ρ/(1 − ρ)·‖s_t − s_{t−1}‖ (s: the prefix's states); times σ_t, the norm
        of the exit path's Jacobian at s_t (power iteration, first order), it bounds the change of the logits
        still to come. `certified logit` stops when that bound is below ε; `certified margin` when √2 times it is
        below the gap between the top two logits, so the answer cannot change. ρ is the stability certificate's
        spectral radius at the long-run state (an asymptotic rate), the measured step rate over the last 4
        recurrences, or the larger of the two (max, conservative). **A model that is not a contraction (ρ ≥ 1) is
        never certified**: the certified rows then run all R_max recurrences, and the contraction table says so.

        **OUTPUT.** `OUT/index.html`; `OUT/figures/exit_compute_quality.png` (loss change and agreement with the
        R_max answer against mean recurrences run, one colour per model); `OUT/tables/exit_summary.csv` (one row
        per model, rule and parameter: recurrences_mean, saved, loss_mean, loss_change, accuracy,
        accuracy_change, agreement, stopped_early, changed_early, n); `exit_contraction.csv` (ρ per model and
        whether it certifies); `exit_prompts.csv`; `exit_positions.csv` (every rule's outcome per position).

        **COST.** One run of R_max recurrences per prompt plus, where some bound is finite, a power iteration
        on the exit path (12 JVP/VJP pairs, then 3 warm-started per recurrence); the default model: 10–20 s a
        prompt at R_max = 32 on one core.

        **EXAMPLES.** `loopscope exit --model default --recurrences 32 --out reports/exit`;
        `loopscope exit -m default -m preset:looped-4 -m smollm2-looped --max-prompts 2 -r 16 --out reports/exit`
        """
        apply_threads(threads)
        from loopscope.experiments.early_exit import ExitSettings, run_exit

        run_exit(ExitSettings(
            models=list(model), prompts=prompts, out=out, recurrences=recurrences,
            fixed=parse_int_list(fixed, "--fixed", minimum=1) if fixed else None,
            eps=parse_float_list(eps, "--eps"), huginn=parse_float_list(huginn_kl, "--huginn-kl"),
            rates=parse_word_list(rate, "--rate"), certificate=certificate, max_prompts=max_prompts,
            precision=precision(device, dtype, state_dtype), progress=not quiet, overwrite=overwrite,
        ))
