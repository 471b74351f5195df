"""`loopscope heal`: heal a retrofitted looped model (or train its matched feedforward control), resumably."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """
Heal a retrofitted-recurrence model (McLeish et al. 2025): train a low-rank update of every layer, the norms and
the injection adapter so that the looped model recovers the depth its split dropped. Only what healing changed
is saved (`OUT/delta`, a few MB); the base weights stay in their own file, whose sha256 the delta records.

**SYNOPSIS**

    loopscope heal OUT [--prelude A-B --core C-D --coda E-F] [--steps N] [--mean-recurrence MU] [--control]

**DESCRIPTION**

Each step reads one batch of GSM8K train + general text (a pure function of the seed and the step), samples
the recurrence r = Poisson(λ) + 1 with log λ ~ N(log μ − σ²/2, σ) under a linear curriculum of μ, runs the
first r − k recurrences without gradients and backpropagates through the last k (`--backprop-depth`), as
the published retrofit recipe does. The start state is Huginn's s_0 ~ TruncNormal(0, 0.0087²).

`--control` trains the matched feedforward control: the base model with every layer and no loop, the same
low-rank update on the same batches, so that the healed model's held-out loss is judged against a model that
saw the same data for the same tokens (domain adaptation alone lowers the loss).

**Stability-aware healing** (all off by default, which is the recipe above): `--jacobian-weight W` adds
W·‖J‖_F²/n, the Jacobian of one recurrence of the block at the step's last state, Hutchinson-estimated with one
Gaussian vector (Bai et al. 2021; one extra vector-Jacobian product per step), or with `--jacobian-power m`
(‖Jᵐ‖_F²/n)^(1/m), which tends to ρ² (m products); `--long-recurrence N` adds
`--long-weight` × the loss at R_long drawn from ⌈N/2⌉..N, the loop continued from the step's state with gradients
through the last `--backprop-depth` recurrences; `--rho-every S` logs ρ, the spectral radius of the block map's
Jacobian after `--rho-recurrence` recurrences on a held-out text (ρ < 1: the loop contracts there), every S steps;
`--adapter-state-scale α` multiplies the adapter's state columns by α at step 0 (z = α·W_s s + W_e e), which
scales the block map's Jacobian by α: a loop whose certificate reads ρ > 1 starts as a contraction for α < 1/ρ.

The layer split is checked before the model is loaded: each layer exists in the source and belongs to at most
one segment.

A killed or interrupted run (Ctrl-C, SIGTERM, `--minutes`) resumes from OUT/checkpoint to the same losses as
an uninterrupted one: run the same command again. A second phase starts from an earlier delta with
`--start-from` and `--step-offset` (the batches it has already seen).

**OUTPUT**

OUT/delta/ (delta.json + delta.safetensors, loadable by `loopscope analyze --model OUT/delta`),
OUT/metrics.json (held-out loss per R, time, tokens), OUT/eval.csv (held-out loss over training),
OUT/history.csv (loss, lr, grad norm, r, k per step; the long-horizon loss, the penalty and ρ when on),
OUT/heldout_per_text.csv, OUT/loss_curve.png (and ρ against the step beside it when logged).

The held-out text is the last 8 GSM8K test question+answer texts (never trained on; SmolLM2-135M as
shipped scores 2.035 nats per token on them).

**EXAMPLES**

    loopscope heal runs/heal/looped --prelude 0-11 --core 12-15 --coda 20-29 --steps 600

    loopscope heal runs/heal/looped2 --start-from runs/heal/looped/delta --step-offset 600 --steps 200 \\
        --mean-recurrence 8 --curriculum-start 4 --backprop-depth 4

    loopscope heal runs/heal/stable --start-from src/loopscope/models/assets/smollm2-looped --step-offset 800 \\
        --steps 300 --mean-recurrence 16 --curriculum-start 8 --backprop-depth 4 --jacobian-weight 10 \\
        --long-recurrence 32 --rho-every 10 --rho-recurrence 64 --data ../shared/data/gsm8k

    loopscope heal runs/heal/control --control --steps 800

    loopscope analyze --model runs/heal/looped2/delta --recurrences 32
"""


def register(app: typer.Typer) -> None:
    @app.command("heal", help=HELP)
    def heal_cmd(
        out: Path = typer.Argument(..., help="Run directory (created; resumed if it holds a checkpoint)."),
        source: str = typer.Option("smollm2", "--source", help="Base model: smollm2, a .gguf or a HF directory."),
        prelude: str = typer.Option("0-11", "--prelude", help="Source layers of the prelude."),
        core: str = typer.Option("12-15", "--core", help="Source layers of the recurrent core."),
        coda: str = typer.Option("20-29", "--coda", help="Source layers of the coda (layers named nowhere are "
                                 "dropped)."),
        control: bool = typer.Option(False, "--control", help="Train the matched feedforward control instead."),
        adapter: str = typer.Option("add", "--adapter", help="Adapter at step 0: add ([I|I]), random, passthrough."),
        steps: int = typer.Option(100, "--steps", help="Optimizer steps (fixes the lr schedule and curriculum)."),
        mean_recurrence: float = typer.Option(4.0, "--mean-recurrence", help="μ, the target mean recurrence rate."),
        curriculum: float = typer.Option(0.25, "--curriculum", help="Fraction of steps over which μ ramps up."),
        curriculum_start: float = typer.Option(1.0, "--curriculum-start", help="μ at step 0."),
        backprop_depth: int = typer.Option(2, "--backprop-depth", help="k: recurrences gradients flow through."),
        lora_rank: int = typer.Option(16, "--lora-rank", help="Rank of the low-rank update."),
        lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
        batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
        seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
        data: str = typer.Option(None, "--data", help="GSM8K directory holding train.jsonl and test.jsonl (needed "
                                 "unless the `datasets` package is installed: then the Hugging Face hub's copy)."),
        start_from: str = typer.Option(None, "--start-from", help="An earlier run's delta to continue from."),
        step_offset: int = typer.Option(0, "--step-offset", help="Batches the earlier phases have already read."),
        eval_recurrences: str = typer.Option("1,4,8", "--eval-recurrences", help="R for the held-out loss."),
        eval_every: int = typer.Option(25, "--eval-every", help="Steps between held-out evaluations."),
        minutes: float = typer.Option(None, "--minutes", help="Stop (resumably) after this much training time."),
        threads: int = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
        seed: int = typer.Option(0, "--seed", help="Seed of batches, recurrences and the low-rank init."),
        jacobian_weight: float = typer.Option(0.0, "--jacobian-weight", help="Weight of the Jacobian penalty "
                                              "‖J‖_F²/n at the step's last state (0: off)."),
        jacobian_power: int = typer.Option(1, "--jacobian-power", help="m: penalise (‖Jᵐ‖_F²/n)^(1/m) instead "
                                           "(→ ρ² as m grows; m products per step)."),
        long_recurrence: int = typer.Option(0, "--long-recurrence", help="Largest R of the long-horizon loss "
                                            "(0: off); R_long is drawn from ⌈N/2⌉..N each step."),
        long_weight: float = typer.Option(0.5, "--long-weight", help="Weight of the long-horizon loss."),
        rho_every: int = typer.Option(0, "--rho-every", help="Steps between estimates of ρ at the long-run state "
                                      "(0: off)."),
        rho_recurrence: int = typer.Option(32, "--rho-recurrence", help="R of the state at which ρ is estimated."),
        checkpoint_minutes: float = typer.Option(5.0, "--checkpoint-minutes", help="Minutes between checkpoints."),
        adapter_state_scale: float = typer.Option(1.0, "--adapter-state-scale", help="α: scale the adapter's "
                                                  "state columns by α at step 0, so ρ → α·ρ (1: off)."),
    ) -> None:
        from loopscope.cli.common import parse_int_list
        from loopscope.experiments.heal import HealSettings, heal

        settings = HealSettings(
            source=source, prelude=prelude, core=core, coda=coda, control=control, adapter=adapter, steps=steps,
            mean_recurrence=mean_recurrence, curriculum=curriculum, curriculum_start=curriculum_start,
            backprop_depth=backprop_depth, lora_rank=lora_rank, lr=lr, batch_size=batch_size, seq_len=seq_len,
            data=data, start_from=start_from, step_offset=step_offset,
            eval_recurrences=tuple(parse_int_list(eval_recurrences, "--eval-recurrences", minimum=1)),
            eval_every=eval_every, minutes=minutes, threads=threads, seed=seed, jacobian_weight=jacobian_weight,
            jacobian_power=jacobian_power,
            long_recurrence=long_recurrence, long_weight=long_weight, rho_every=rho_every,
            rho_recurrence=rho_recurrence, checkpoint_minutes=checkpoint_minutes,
            adapter_state_scale=adapter_state_scale,
        )
        try:
            m = heal(settings, out)
        except KeyboardInterrupt as exc:
            typer.echo(str(exc))
            raise typer.Exit(130)
        losses = ", ".join(f"R={k[1:]} {v:.3f}" for k, v in m["heldout"].items())
        rho = f"; ρ {m['rho_start']['rho']:.3f} → {m['rho']['rho']:.3f}" if m["rho"] else ""
        typer.echo(f"{m['steps']} steps, {m['tokens_seen']:,} tokens, {m['train_wall_s'] / 60:.1f} min; "
                   f"held-out loss {losses}{rho}; delta {m['delta_bytes'] / 1e6:.1f} MB in {m['delta_dir']}")
