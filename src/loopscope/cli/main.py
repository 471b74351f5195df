"""`loopscope`: command-line entry point.

Each subcommand lives in its own module under `loopscope.cli` and is registered in `SUBCOMMANDS` below.
Errors in what the user gave (a path, a prompt file, a number) print one line naming the problem and the fix,
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import sys

import typer

from loopscope.errors import LoopscopeError

app = typer.Typer(
    name="loopscope",
    help=(
        "Mechanistic analysis of looped (depth-recurrent) language models.\n\n"
        "Data flows one way: model → capture → Trajectory → analyses → tables and figures → report. "
        "Every command writes CSV tables behind every figure and a self-contained index.html."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)

@app.callback()
def _root() -> None:
    """Mechanistic analysis of looped (depth-recurrent) language models."""


# module name under loopscope.cli; each defines `register(app)`
SUBCOMMANDS = ["models_cmd", "analyze", "compare", "intervene", "grid", "retrofit", "train", "extrapolate",
               "conditions", "reproduce", "heal", "exit_cmd"]


def _register_all() -> None:
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"loopscope.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"loopscope.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except LoopscopeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise  # anything else is a bug, with its traceback
        where = f" writing {exc.filename}" if exc.filename else ""
        typer.secho(f"error: {exc.strerror}{where}; {DISK_ERRORS[exc.errno]} (finished work is cached: the same "
                    "command resumes)", fg=typer.colors.RED, err=True)
        sys.exit(2)


# what the user can do about a failed write: the disk, not the code, is at fault
DISK_ERRORS = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some of your quota",
               errno.EROFS: "the location is read-only; choose another --out",
               errno.EACCES: "choose a folder you may write", errno.EIO: "the disk failed; check it"}


if __name__ == "__main__":
    main()
