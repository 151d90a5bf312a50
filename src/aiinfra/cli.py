"""The `aiinfra` command line. Thin: each command parses its arguments and calls one function of a pillar."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """Train, serve, plan and watch language models."""
