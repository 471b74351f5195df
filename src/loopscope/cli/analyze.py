"""`loopscope analyze`: one model and one prompt set in, one report out."""

from __future__ import annotations

from pathlib import Path

import typer

from loopscope.cli.common import (
    apply_threads,
    device_option,
    dtype_option,
    overwrite_option,
    parse_token_list,
    state_dtype_option,
    threads_option,
)


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze(
        model: str = typer.Option("default", "--model", "-m", help="Builtin name (see `loopscope models`) or a "
                                  "checkpoint path: loopscope directory, Hugging Face directory, .gguf file, "
                                  "Ouro / Huginn / retrofit directory."),
        prompts: str = typer.Option("gsm-symbolic", "--prompts", "-p", help="Builtin prompt set (`gsm-symbolic`) or "
                                    "a file: .jsonl with a question/prompt/text field, or .txt with one prompt a "
                                    "line."),
        out: Path = typer.Option(Path("reports/analysis"), "--out", "-o", help="Report directory (created). Holds "
                                 "index.html, figures/*.png, tables/*.csv and cache/ (finished capture batches)."),
        recurrences: int = typer.Option(64, "--recurrences", "-r", help="Recurrences of the dynamics run; the state "
                                        "at the last one is the approximate fixed point (the paper uses 128)."),
        attention_recurrences: int = typer.Option(8, "--attention-recurrences", help="Recurrences of the run that "
                                                  "also captures attention (memory grows as R·K·B·H·T²)."),
        max_prompts: int = typer.Option(None, "--max-prompts", help="Use only the first N prompts."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
        pca_prompt: int = typer.Option(0, "--pca-prompt", help="Prompt whose last token the PCA figure follows "
                                       "(shorthand for --keep-states PROMPT:-1)."),
        keep_states: str = typer.Option(None, "--keep-states", help="PROMPT:TOKEN pairs, comma-separated, whose "
                                        "every state is kept for the PCA figure (the first pair is drawn; negative "
                                        "tokens count from the last real one). Nothing else keeps full states."),
        similarity_recurrences: int = typer.Option(None, "--similarity-recurrences", help="Recurrences the "
                                                   "similarity maps (Figs. 2, 19) draw; their states are the only "
                                                   "ones kept per batch (default: all of the attention run)."),
        certificate_tokens: int = typer.Option(16, "--certificate-tokens", help="Tokens (spread over the prompts) "
                                               "whose block Jacobian's leading eigenvalues are estimated by Arnoldi "
                                               "iteration: the stability certificate (0: skip)."),
        lens_prompts: int = typer.Option(None, "--lens-prompts", help="Prompts of the lens section (default none): the "
                                         "Jacobian lens and an affine lens fitted per (segment, recurrence, layer) "
                                         "on the first half, read beside the logit lens on the other half, at "
                                         "--attention-recurrences. Costs D backward passes per fit batch (the "
                                         "default model: ≈ 20 s a prompt at R = 8 on one core)."),
        lens_probes: int = typer.Option(None, "--lens-probes", help="Random orthonormal probes of the Jacobian-lens "
                                        "fit (default: exact, D = the model width): an unbiased sketch at k/D of "
                                        "the cost."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        feedforward: str = typer.Option(None, "--feedforward", help="A feedforward model (builtin such as smollm2, "
                                        "HF directory or .gguf) whose stage profile is overlaid on every "
                                        "by-recurrence figure and scored against each recurrence "
                                        "(tables/alignment.csv)."),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Capture a model on a prompt set and write a report of its dynamics.

        **What it does.** Streams every prompt through the model in two runs: a long run (`--recurrences`) reading
        every layer's residual state at every recurrence, and a short run (`--attention-recurrences`) that also
        reads every head's attention. Each state is reduced as it is produced and then dropped, so memory is one
        batch at one recurrence whatever R and the number of prompts. Per block layer and recurrence: the change
        between consecutive recurrences, the distance to the long-run state (exact, from a second deterministic
        pass), similarity matrices over all (layer, recurrence) pairs, a cyclic-versus-degenerate fixed-point
        verdict, each token's behaviour (fixed point, orbit with its period, slider, divergent) by two detectors
        with a threshold sweep, Prop. 4.2 on every prompt, and a PCA of one token's trajectory.

        **Precision.** `--device`, `--dtype` (weights) and `--state-dtype` (the stream, float32 by default). The
        report states the run's numerical floor and draws it on the convergence figures.

        **Several processes.** `torchrun --nproc_per_node N $(which loopscope) analyze …` shares the batches
        between N processes (gloo on the CPU, nccl on GPUs); rank 0 merges every result and writes the report,
        equal to a one-process run.

        **Feedforward models.** `--model smollm2` (or any feedforward model, R = 1) is captured once with
        attention and gets the stages-of-inference sections only; the dynamics sections need R ≥ 2 and are
        replaced by a note. `--feedforward MODEL` overlays a feedforward model's stages on a looped model's.

        **Lenses.** `--lens-prompts N` adds a section reading every state of the attention run through the logit
        lens, the Jacobian lens (W_U·n_f(J h), J the mean over tokens of Σ_t' ∂h_final,t'/∂h_t, fitted per
        (segment, recurrence, layer) from vector-Jacobian products; Gurnee et al. 2026) and an affine
        least-squares lens (a tuned-lens-style baseline): top-1 agreement with the final prediction, KL to the
        final distribution and rank of the final token, per recurrence and layer. Off by default: the exact fit
        costs one backward pass per model dimension per batch.

        **Output.** `OUT/index.html` (self-contained), `OUT/figures/*.png`, `OUT/tables/*.csv` (every number
        plotted), `OUT/report.json`.

        **Resuming.** Each finished batch's reduced results (not its states) are kept in `OUT/cache`, keyed on
        the settings and the weights; rerunning the same command after an interruption skips them and gives
        identical tables. `OUT/manifest.json` records the settings, the weights' fingerprint, the versions and
        every file written: a rerun with other settings or other weights is refused unless `--overwrite`, and a
        second run into a folder another run is writing is refused.

        **Example.** `loopscope analyze --model default --prompts gsm-symbolic --recurrences 128 --out reports/r128`
        """
        apply_threads(threads)
        from loopscope.experiments.analyze import AnalyzeSettings, run_analyze

        keep = parse_token_list(keep_states) if keep_states else ((pca_prompt, -1),)
        run_analyze(AnalyzeSettings(
            model=model, prompts=prompts, out=out, recurrences=recurrences,
            attention_recurrences=attention_recurrences, similarity_recurrences=similarity_recurrences,
            max_prompts=max_prompts, batch_size=batch_size, keep_states=keep, feedforward=feedforward,
            certificate_tokens=certificate_tokens, lens_prompts=lens_prompts, lens_probes=lens_probes,
            device=device, dtype=dtype, state_dtype=state_dtype, progress=not quiet, overwrite=overwrite,
        ))
