"""`loopscope reproduce`: the paper's study end to end, one report with the claims table first."""

from __future__ import annotations

from pathlib import Path

import typer

from loopscope.cli.common import device_option, dtype_option, overwrite_option, precision, state_dtype_option

HELP = """
Reproduce Blayney et al. (2026) on this machine: train, analyse, and judge every claim of the paper.

**SYNOPSIS**

`loopscope reproduce --data DIR [--out DIR] [--quick] [--minutes-per-model M] [--threads N] [--quiet]`

`loopscope reproduce --pretrained --data DIR [--looped FAMILY=PATH]... [--feedforward NAME=PATH] [--questions N]
[--recurrences R] [--attention-recurrences R] [--quick] [--device D] [--dtype T] [--out DIR]`

**DESCRIPTION**

Runs the paper's study, scaled to a CPU, and writes one report whose first table lists the paper's claims,
one line each, with the effect, its 95 % interval and a verdict: holds / differs when the interval lies on
one side of a threshold fixed before the run, inconclusive when it straddles it, not measurable here, or
effect only where no threshold could be fixed before seeing data. The verdicts come from explicit rules
(`loopscope.experiments.claims`); the thresholds, with their reasons and sources, are shown in the report.

**STAGES**

1. Train from scratch on GSM8K: `looped-4`, `looped-8`, `looped-12` ((2, k⊗4, 2), pre-norm, 4 recurrences),
`looped-4+inject`, `looped-4+noprelude`, `looped-4+sandwich` (the same model with Huginn's sandwich norm: the
matched norm comparison) and the `feedforward-12` control, each once per seed (`--seeds`, 3 by default) for
`--minutes-per-model`. Every comparison of two variants is judged seed by seed, with a 95 % interval over seeds.

2. Analyse every trained looped model and the builtin `default` ((2, 4⊗4, 2)_I, sandwich norm): convergence
and Prop. 4.1, distinct vs degenerate fixed points, per-token behaviours, attention stabilisation and the
Prop. 4.2 bound, stages of inference against the control (alignment), massive activations.

3. The massive-activation ablation (Fig. 41): the MLP of the layer that first carries the massive
activations is zeroed in the pre-norm trained model with the largest massive-activation ratio and in SmolLM2
(real weights, where massive activations certainly exist), and the attention stages are measured again.

4. The random-initialisation grid: norm × injection × block size × seed.

5. Extrapolation of the looped models to 8× their training recurrences (loss, accuracy, stability, alignment);
orbit/slider rates under system-prompt conditions on `looped-4+inject`.

6. The report: claims, training curves, then every section of the stages above.

**PRETRAINED CHECKPOINTS** (`--pretrained`)

The pretrained half of the paper on checkpoints you downloaded, given by path: `--looped FAMILY=PATH` for each
of `ouro`, `huginn` and `retrofit` (the folder as published; it must load as that family) and one `--feedforward
NAME=PATH`, a Hugging Face feedforward folder (the paper's Llama-3.2-1B) that every looped model's stages are
aligned with. Rows judged, each per model with a 95 % bootstrap interval over GSM8K questions: distinct per-layer
fixed points for Huginn and the retrofit, none for Ouro (Fig. 4); Ouro and the retrofit follow the reference's
stages, Huginn shows none (Figs. 8, 36, 40); Ouro unstable and Huginn / retrofit stable beyond their training
recurrences (§6.2); App. C on Huginn (rare non-fixed-point tokens, the persona prompt, orbit/slider
co-occurrence); massive activations in the retrofit and none in Huginn (Fig. 9); the Fig. 41 ablation on the
retrofit (effect only: no threshold was fixed before an ablation was seen). A family not given makes only its
own rows "not measurable here": no builtin or toy model stands in for Ouro or Huginn; the builtin `smollm2-looped`
(aligned with its base, SmolLM2) stands in for the retrofit when no retrofit checkpoint is given, and its rows say
so. Defaults follow the paper: 256 questions, R = 128, stage profiles at 8 recurrences, App. C at R = 128;
`--quick` uses 4 questions, R = 32 and 4; `--questions`, `--recurrences`, `--attention-recurrences` override.
Stages: `pretrained-reference-NAME`, `pretrained-FAMILY`, `pretrained-ablate-retrofit`, `pretrained-conditions`
(Huginn), each resumable and keyed by the checkpoint files' sha256. Every unit a row is judged from is written to
`OUT/tables/pretrained_*.csv`.

**MODES**

Full (default): 7 presets × 3 seeds trained for 2 minutes each (42 minutes of training), then 19 analyses, the
grid over two widths and two injected-signal scales, extrapolation and conditions on the first seed's models;
measured at 2 h 24 min on 2 shared CPU cores (grid 53 min, training 50 min), plus 35 minutes for the retrofit
rows (`--no-retrofit` skips them).
`--seeds N` and `--minutes-per-model M` scale it up where there is more compute.

`--quick`: `micro` models trained for 12 steps with 2 seeds, a 12-cell grid, a few prompts; a few minutes. It checks
that the pipeline runs; its verdicts say nothing about the paper.

**RESUMING**

Every stage is saved when it finishes (OUT/runs/PRESET-sSEED for training checkpoints, OUT/stages/NAME for the
tables of every other stage). After a kill, run the same command again: finished stages are loaded, training
continues from its last checkpoint, the grid from its last cell. Changing an option that a finished stage
depends on stops with an error; use a new --out.

**FILES** (in OUT)

`index.html` (self-contained report), `tables/claims.csv` (the claims table), `tables/*.csv` and `figures/*.png`
(every number plotted), `models/NAME/` (per-model figures and tables), `runs/PRESET-sSEED/model` (the trained
checkpoints: `--model OUT/runs/looped-4-s0/model` in other commands), `stages/` (resumable stage results).

**EXAMPLES**

`loopscope reproduce --data ../shared/data/gsm8k --out reports/reproduce`

`loopscope reproduce --data ../shared/data/gsm8k --quick --out reports/reproduce-quick`

`loopscope reproduce --pretrained --data ../shared/data/gsm8k --looped ouro=/ckpt/Ouro-1.4B --looped
huginn=/ckpt/huginn-0125 --looped retrofit=/ckpt/retro-llama --feedforward llama=/ckpt/Llama-3.2-1B --device cuda
--dtype bfloat16 --out reports/pretrained` (the paper's pretrained rows on the published checkpoints)

`loopscope reproduce --data ../shared/data/gsm8k --retrofit-only --out reports/retrofit` (the healed SmolLM2
retrofit against SmolLM2: fixed points at R = 128, stages, the Fig. 41 ablation, loss and accuracy against R)
"""


def register(app: typer.Typer) -> None:
    @app.command("reproduce", help=HELP)
    def reproduce_cmd(
        data: str | None = typer.Option(None, "--data", help="GSM8K directory holding the official train.jsonl "
                                        "and test.jsonl (required; nothing is downloaded)"),
        out: Path = typer.Option(Path("reports/reproduce"), "--out", "-o", help="report directory (created; a "
                                 "run already there is resumed)"),
        quick: bool = typer.Option(False, "--quick", help="micro models, 12 training steps, small grid: checks "
                                   "the pipeline in under 3 minutes"),
        minutes_per_model: float | None = typer.Option(None, "--minutes-per-model", help="training wall time per "
                                                       "model (default 2 in full mode; quick mode trains 12 steps)"),
        seeds: int | None = typer.Option(None, "--seeds", help="training seeds per preset (default 3 in full mode, "
                                         "2 in quick mode); comparisons of variants get intervals over seeds"),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest on a shared machine)"),
        retrofit: bool | None = typer.Option(None, "--retrofit/--no-retrofit", help="measure the retrofit claims on "
                                             "the healed SmolLM2 (smollm2-looped); default: in full mode only"),
        retrofit_only: bool = typer.Option(False, "--retrofit-only", help="only the retrofit stages and claims: "
                                           "smollm2-looped at R = 128 against SmolLM2 (≈ 20 min on one core)"),
        pretrained: bool = typer.Option(False, "--pretrained", help="only the pretrained study on the checkpoints "
                                        "given by --looped / --feedforward (see PRETRAINED CHECKPOINTS)"),
        looped: list[str] = typer.Option([], "--looped", help="FAMILY=PATH, FAMILY one of ouro, huginn, retrofit: "
                                         "a published looped checkpoint folder (repeat for each family)"),
        feedforward: list[str] = typer.Option([], "--feedforward", help="NAME=PATH: the feedforward reference "
                                              "(a Hugging Face folder, e.g. llama=/ckpt/Llama-3.2-1B)"),
        questions: int | None = typer.Option(None, "--questions", help="pretrained: GSM8K test questions (default "
                                             "256, the paper's; --quick 4)"),
        recurrences: int | None = typer.Option(None, "--recurrences", help="pretrained: R of the dynamics and of "
                                               "App. C (default 128, the paper's; --quick 32)"),
        attention_recurrences: int | None = typer.Option(None, "--attention-recurrences", help="pretrained: R of "
                                                         "the stage profiles (default 8, the paper's; --quick 4)"),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ) -> None:
        from loopscope.experiments.reproduce import ReproduceSettings, run_reproduce

        s = ReproduceSettings(out=out, data=data, quick=quick, minutes_per_model=minutes_per_model, seeds=seeds,
                              threads=threads,
                              retrofit=retrofit, retrofit_only=retrofit_only, progress=not quiet, overwrite=overwrite,
                              pretrained=pretrained, looped=list(looped), feedforward=list(feedforward),
                              questions=questions, recurrences=recurrences,
                              attention_recurrences=attention_recurrences,
                              precision=precision(device, dtype, state_dtype))
        try:
            index = run_reproduce(s)
        except KeyboardInterrupt:
            typer.echo("interrupted; run the same command to resume (finished stages are kept)", err=True)
            raise typer.Exit(130) from None
        typer.echo(f"wrote {index}")
