"""`loopscope analyze`: one model and one prompt set in, one report out."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze(
        model: str = typer.Option("default", "--model", "-m", help="Builtin name (see `loopscope models`) or a "
                                  "checkpoint path: loopscope directory, Hugging Face directory, .gguf file, "
                                  "Ouro / Huginn / retrofit directory."),
        prompts: str = typer.Option("gsm-symbolic", "--prompts", "-p", help="Builtin prompt set (`gsm-symbolic`) or "
                                    "a file: .jsonl with a question/prompt/text field, or .txt with one prompt a line."),
        out: Path = typer.Option(Path("reports/analysis"), "--out", "-o", help="Report directory (created). Holds "
                                 "index.html, figures/*.png, tables/*.csv and cache/ (finished capture batches)."),
        recurrences: int = typer.Option(64, "--recurrences", "-r", help="Recurrences of the dynamics run; the state "
                                        "at the last one is the approximate fixed point (the paper uses 128)."),
        attention_recurrences: int = typer.Option(8, "--attention-recurrences", help="Recurrences of the run that "
                                                  "also captures attention (memory grows as R·K·B·H·T²)."),
        max_prompts: int = typer.Option(None, "--max-prompts", help="Use only the first N prompts."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
        pca_prompt: int = typer.Option(0, "--pca-prompt", help="Prompt whose last token the PCA figure follows."),
        feedforward: str = typer.Option(None, "--feedforward", help="A feedforward model (builtin such as smollm2, "
                                        "HF directory or .gguf) whose stage profile is overlaid on every "
                                        "by-recurrence figure and scored against each recurrence "
                                        "(tables/alignment.csv)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Capture a model on a prompt set and write a report of its dynamics.

        **What it does.** Runs every prompt through the model twice: a long run (`--recurrences`) recording every
        layer's residual state at every recurrence, and a short run (`--attention-recurrences`) that also records
        every head's attention. From these it computes, per block layer and recurrence: the change between
        consecutive recurrences, the distance to the long-run state, similarity matrices over all (layer,
        recurrence) pairs, a cyclic-versus-degenerate fixed-point verdict, each token's behaviour (fixed point,
        orbit with its period, slider, divergent) by two detectors, and a PCA of one token's trajectory.

        **Feedforward models.** `--model smollm2` (or any feedforward model, R = 1) is captured once with
        attention and gets the stages-of-inference sections only; the dynamics sections need R ≥ 2 and are
        replaced by a note. `--feedforward MODEL` overlays a feedforward model's stages on a looped model's.

        **Output.** `OUT/index.html` (self-contained), `OUT/figures/*.png`, `OUT/tables/*.csv` (every number
        plotted), `OUT/report.json`.

        **Resuming.** Finished capture batches are kept in `OUT/cache`; rerunning the same command after an
        interruption skips them.

        **Example.** `loopscope analyze --model default --prompts gsm-symbolic --recurrences 128 --out reports/r128`
        """
        from loopscope.experiments.analyze import AnalyzeSettings, run_analyze

        run_analyze(AnalyzeSettings(
            model=model, prompts=prompts, out=out, recurrences=recurrences,
            attention_recurrences=attention_recurrences, max_prompts=max_prompts, batch_size=batch_size,
            pca_prompt=pca_prompt, feedforward=feedforward, progress=not quiet,
        ))
