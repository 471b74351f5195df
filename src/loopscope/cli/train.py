"""`loopscope train`: train a looped model from scratch on the CPU (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer

from loopscope.cli.common import device_option, dtype_option

HELP = """
Train a looped (depth-recurrent) LM from scratch on the CPU, resumably.

**SYNOPSIS**

`loopscope train --config PRESET --out DIR (--steps N | --minutes M) [--data PATH] [--seed S] [options]`

**DESCRIPTION**

Trains a `(p, k⊗l, c)` LoopedLM with next-token cross-entropy on the final state only, a constant number
of recurrences and pre-norm (Blayney et al. 2026 §6.3, scaled down: d_model 128, 4 heads, SwiGLU 344,
sequences of 256 tokens, batch 16), AdamW, warmup + cosine decay, gradient clipping, all seeded. Text:
GSM8K train questions with worked answers, tokenized with the bundled 1024-token BPE and packed.

**PRESETS** (`--config`; add modifiers with +, e.g. `looped-4+inject+sandwich`)

`looped-4`, `looped-8`, `looped-12`: (2, k⊗4, 2), pre-norm, no injection, s_0 = prelude output.
`feedforward-12`: (0, 12⊗1, 0), the depth-12 feedforward control. `micro`: a tiny model for tests.
`+inject`: concat input injection. `+noprelude`: (0, k⊗4, 0). `+sandwich`: Huginn sandwich norm.

**HEALING A RETROFIT** (`--from-retrofit DIR`)

Instead of a preset, continue training a looped checkpoint as loaded, e.g. the output of `loopscope retrofit`
(McLeish et al. 2025 heal the model after the surgery by continued training). The checkpoint's own tokenizer
encodes the text; the recurrences are the checkpoint's own. Keep batches small on a CPU
(`--batch-size 4 --seq-len 128`). DIR/model is then a loopscope checkpoint of the healed model.

**STOPPING**

`--steps N` fixes the learning-rate schedule. `--minutes M` caps training wall time (summed over resumed
calls); with `--minutes` alone the step budget is set from the speed of the first steps and recorded.
For a bit-reproducible run give `--steps`.

**RESUMING**

DIR/checkpoint (safetensors + JSON, never pickle) is written every `--checkpoint-every` steps, every
`--checkpoint-minutes`, on Ctrl-C/SIGTERM and at the end. Run the same command again to continue exactly
where it stopped; a finished run is only re-evaluated.

**FILES** (in DIR)

`model/` (config.json, model.safetensors, tokenizer; `--model DIR/model` in other commands),
`metrics.json` (held-out loss and bits/token on the fixed 256-question GSM8K test subset, trained and
untrained, greedy exact match, speed), `history.csv` (loss, lr, gradient norm per step), `eval.csv`.

**EXAMPLES**

`loopscope train --config looped-4 --out runs/l4 --minutes 10 --data ../shared/data/gsm8k`

`loopscope train --config looped-4+inject+sandwich --out runs/default --steps 600 --data ../shared/data/gsm8k`

`loopscope train --from-retrofit runs/smollm2-retro --out runs/healed --minutes 50 --batch-size 4 --seq-len 128
--lr 1e-4 --warmup-steps 10 --heldout-sequences 32 --data ../shared/data/gsm8k --threads 2`
"""


def register(app: typer.Typer) -> None:
    @app.command("train", help=HELP)
    def train_cmd(
        config: str = typer.Option("looped-4", "--config", help="model preset, e.g. looped-4, feedforward-12, "
                                   "looped-4+inject+sandwich"),
        from_retrofit: str | None = typer.Option(None, "--from-retrofit", help="continue training this looped "
                                                 "checkpoint (e.g. `loopscope retrofit` output) instead of a "
                                                 "preset: 'healing'; its own tokenizer encodes the data"),
        out: Path = typer.Option(..., "--out", help="run directory (created; an existing run there is resumed)"),
        steps: int | None = typer.Option(None, "--steps", help="optimizer steps (fixes the lr schedule)"),
        minutes: float | None = typer.Option(None, "--minutes", help="cap on training wall time in minutes"),
        data: str | None = typer.Option(None, "--data", help="GSM8K jsonl file or directory with "
                                        "train.jsonl/test.jsonl (needed unless `datasets` is installed)"),
        seed: int = typer.Option(0, "--seed", help="seed for weights, shuffling and batch order"),
        corpus: str = typer.Option("gsm8k", "--corpus", help="training text: gsm8k, gsm-symbolic:N, python-docs "
                                   "(non-reasoning control), joined with +"),
        batch_size: int = typer.Option(16, "--batch-size", help="sequences per step"),
        seq_len: int = typer.Option(256, "--seq-len", help="tokens per packed sequence"),
        lr: float = typer.Option(2e-3, "--lr", help="peak learning rate"),
        warmup_steps: int = typer.Option(30, "--warmup-steps", help="linear warmup steps"),
        schedule: str = typer.Option("cosine", "--schedule", help="decay after warmup: cosine or linear"),
        eval_every: int = typer.Option(50, "--eval-every", help="steps between quick held-out evaluations"),
        heldout_sequences: int | None = typer.Option(None, "--heldout-sequences", help="evaluate the final "
                                                     "model on only the first N held-out sequences (default: all)"),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="steps between checkpoints"),
        checkpoint_minutes: float = typer.Option(2.0, "--checkpoint-minutes", help="minutes between checkpoints"),
        accuracy_questions: int = typer.Option(16, "--accuracy-questions", help="held-out questions to "
                                               "greedy-decode for exact match at the end (0: skip)"),
        save_dtype: str = typer.Option("float32", "--save-dtype", help="weights dtype of DIR/model: float32 "
                                       "or float16"),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all; 1 is faster "
                                           "when other jobs share the cores)"),
        device: str = device_option("cpu"),
        dtype: str = dtype_option(),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    ) -> None:
        from loopscope.experiments.train import TrainSettings, train

        settings = TrainSettings(
            preset=config, steps=steps, minutes=minutes, seed=seed, data=data, corpus=corpus,
            batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, schedule=schedule,
            eval_every=eval_every, checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
            accuracy_questions=accuracy_questions, save_dtype=save_dtype, threads=threads, init_from=from_retrofit,
            heldout_sequences=heldout_sequences, device=device, dtype=dtype,
        )
        try:
            m = train(settings, out, progress=not quiet)
        except KeyboardInterrupt as exc:
            typer.echo(str(exc) or "interrupted; run the same command to resume", err=True)
            raise typer.Exit(130) from None
        h, u = m["heldout"], m["heldout_untrained"]
        typer.echo(
            f"{m['preset']} {m['signature']}: {m['steps']}/{m['total_steps']} steps in {m['train_wall_s']:.0f} s; "
            f"held-out ({m['heldout_name']}) loss {h['loss']:.3f} nats = {h['bits_per_token']:.3f} bits/token "
            f"(untrained {u['loss']:.3f})"
            + (f"; exact match {m['exact_match']['accuracy']:.1%} of {m['exact_match']['n']}"
               if m["exact_match"] else "")
        )
        typer.echo(f"model: {m['model_dir']} ({m['model_bytes']} bytes); metrics: {Path(out) / 'metrics.json'}")
