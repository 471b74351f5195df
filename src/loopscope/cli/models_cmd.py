"""`loopscope models`: list builtin models and what each is."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models() -> None:
        """List the builtin model names that `--model` accepts (besides paths)."""
        from loopscope.models.load import BUILTINS, _import_loaders

        _import_loaders()
        for name, (description, _) in sorted(BUILTINS.items()):
            typer.echo(f"{name:24s} {description}")
