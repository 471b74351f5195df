"""`loopscope intervene`: zero, delete or swap layers and report what moved."""

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
    @app.command("intervene")
    def intervene_cmd(
        model: str = typer.Option("default", "--model", "-m", help="Builtin name (see `loopscope models`) or a "
                                  "checkpoint path."),
        prompts: str = typer.Option("gsm-symbolic", "--prompts", "-p", help="Builtin prompt set or a file (.jsonl "
                                    "with a question/prompt/text field, .txt with one prompt a line)."),
        out: Path = typer.Option(Path("reports/intervene"), "--out", "-o", help="Report directory (created)."),
        zero_mlp: list[str] = typer.Option([], "--zero-mlp", help="Zero what this layer's MLP adds to the stream: "
                                           "SEGMENT:LAYER, e.g. core:2 (segments prelude, core, coda; a feedforward "
                                           "model has core only). Repeatable."),
        zero_attn: list[str] = typer.Option([], "--zero-attn", help="Zero what this layer's attention adds: "
                                            "SEGMENT:LAYER, e.g. prelude:0. Repeatable."),
        at_recurrences: str = typer.Option(None, "--at-recurrences", help="Zero only at these recurrences "
                                           "(0-based, comma-separated, e.g. 0,1); default: every recurrence; `none`: "
                                           "nowhere (a control run that must give KL 0)."),
        delete: list[str] = typer.Option([], "--delete", help="Skip a layer (output = input): SEGMENT:LAYER, e.g. "
                                         "core:3. Repeatable; applied in order, each shifting later positions."),
        swap: list[str] = typer.Option([], "--swap", help="Run two adjacent layers in the other order: "
                                       "SEGMENT:LAYER,LAYER+1, e.g. core:1,2. Repeatable."),
        massive_activation_ablation: bool = typer.Option(False, "--massive-activation-ablation", help="Find the "
                                                         "layer whose output first carries the massive activations "
                                                         "and zero its MLP at every recurrence (instead of the "
                                                         "options above)."),
        feedforward: str = typer.Option(None, "--feedforward", help="Also align both runs with this feedforward "
                                        "model's stage profile (e.g. smollm2)."),
        recurrences: int = typer.Option(None, "--recurrences", "-r", help="Recurrences of both runs (default: the "
                                        "model's own; a feedforward model runs once)."),
        max_prompts: int = typer.Option(8, "--max-prompts", help="Use only the first N prompts."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Change a run of the model and report every stage metric before against after, and the KL.

        **What it does.** Captures the prompts with attention, applies the interventions (zero a layer's MLP or
        attention output — at every recurrence or only `--at-recurrences` —, delete a layer, swap two adjacent
        layers), captures again, and compares: every stage metric (ColSum concentration, sink rate, mixing,
        previous-token attention, residual entropy, norms and massive activations, logit lens) in the three views
        with the unchanged model dashed grey underneath, the alignment of every pass with the unchanged one, and
        the KL of the next-token distribution to the unchanged model per token.

        **Massive-activation ablation.** `--massive-activation-ablation` finds the onset layer — the earliest
        state (prelude, every recurrence's block, coda) whose peak |activation| (mean over prompts of max |x|)
        reaches half the largest peak — and zeroes that layer's MLP at every recurrence (Blayney et al. 2026,
        Fig. 41). The report says whether the model has massive activations at all (peak / median ≥ 100).

        **Output.** `OUT/index.html`, `OUT/figures/*.png`, `OUT/tables/*.csv` (kl_per_token, kl_summary,
        profile_summary, alignment_to_baseline, massive_profile, stages_per_state[_baseline], …).

        **Examples.** `loopscope intervene --model default --zero-mlp core:2 --at-recurrences 0,1`;
        `loopscope intervene --model smollm2 --massive-activation-ablation --prompts gsm8k.jsonl`
        """
        apply_threads(threads)
        from loopscope.experiments.intervene import InterveneSettings, run_intervene
        from loopscope.interventions.parse import parse_interventions

        specs = parse_interventions(zero_mlp, zero_attn, delete, swap, at_recurrences)
        index = run_intervene(InterveneSettings(
            model=model, prompts=prompts, out=out, specs=specs,
            massive_activation_ablation=massive_activation_ablation, recurrences=recurrences,
            feedforward=feedforward, max_prompts=max_prompts, batch_size=batch_size, progress=not quiet,
            overwrite=overwrite,
            precision=precision(device, dtype, state_dtype),
        ))
        typer.echo(f"wrote {index}")
