"""`loopscope grid`: the random-initialisation architecture study."""

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
    @app.command("grid")
    def grid(
        out: Path = typer.Option(Path("reports/grid"), "--out", "-o", help="Report directory (created)."),
        norms: str = typer.Option("pre,sandwich,ouro", "--norms", help="Comma-separated norm placements."),
        injections: str = typer.Option("none,concat", "--injections", help="Comma-separated: none, add, concat."),
        blocks: str = typer.Option("4,12,16", "--blocks", help="Comma-separated block sizes k."),
        seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated initialisation seeds."),
        widths: str = typer.Option("64", "--widths", help="Comma-separated widths D (the paper does not publish its "
                                   "own; each is an axis of the grid)."),
        injected_rms: str = typer.Option("0.6325", "--injected-rms", help="Comma-separated per-element RMS of the "
                                         "injected embedding (default: Huginn's rule, √(2/5); 1 = a normed prelude "
                                         "output). An axis of the grid."),
        recurrences: int = typer.Option(128, "--recurrences", "-r", help="Recurrences per model (paper: 128)."),
        init_std: float = typer.Option(None, "--init-std", help="Weight init std (default: Huginn's sqrt(2/(5D)); "
                                       "the paper does not publish its own)."),
        quick: bool = typer.Option(False, "--quick", help="Block size 4, one seed, 64 recurrences (about a minute)."),
        device: str = device_option(),
        dtype: str = dtype_option(),
        state_dtype: str = state_dtype_option(),
        threads: int = threads_option(),
        overwrite: bool = overwrite_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Which norm / injection / block-size combinations reach a stable cyclic fixed point at random init?

        **What it does.** Builds one randomly initialised `(0, k⊗R, 0)` looped model per cell of norm ×
        injection × block size × seed × width × injected RMS (Blayney et al. §4.2; the last two are settings the
        paper leaves open, and they flip verdicts), runs the bundled prompts through `--recurrences`
        recurrences, and judges each: stable or not (does the last layer stop changing?), and if stable,
        distinct or degenerate (do all layers share one fixed point?).

        **Output.** `OUT/index.html` with a verdict table beside the paper's verdicts (with injection: stable for
        every norm but Ouro's; without: only pre-norm, degenerate), the Fig. 29/30-style curves and the
        degeneracy matrix; `OUT/grid_cells.csv` (one row per cell), `grid_curves.csv`, `grid_certificates.csv`.
        Each finished cell is kept whole in `OUT/cache/grid/`, keyed on every setting that changes it: an
        interrupted grid resumes where it stopped, and a rerun with other settings recomputes, never reuses.
        """
        apply_threads(threads)
        from loopscope.experiments.grid import GridSettings, run_grid_report

        s = GridSettings(out=out, norms=tuple(parse_word_list(norms, "--norms")),  # run_grid checks the names
                         injections=tuple(parse_word_list(injections, "--injections")),
                         block_sizes=tuple(parse_int_list(blocks, "--blocks", minimum=1)),
                         seeds=tuple(parse_int_list(seeds, "--seeds", minimum=0)),
                         widths=tuple(parse_int_list(widths, "--widths", minimum=8)),
                         injected_rms=tuple(parse_float_list(injected_rms, "--injected-rms", minimum=1e-6)),
                         recurrences=recurrences, init_std=init_std, progress=not quiet, overwrite=overwrite,
                         precision=precision(device, dtype, state_dtype))
        if quick:
            s.block_sizes, s.seeds, s.recurrences = (4,), (0,), 64
        typer.echo(f"wrote {run_grid_report(s)}")
