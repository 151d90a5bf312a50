"""`aiinfra export RUN --format hf`: a plain typer-compatible function (registered by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aiinfra.config import ConfigError

EXPORT_FORMATS = ("hf",)


def export_command(
    run: Annotated[Path, typer.Argument(help="a finished run directory (model.safetensors, config.toml, tokenizer)")],
    format: Annotated[str, typer.Option("--format", help="hf: a Hugging Face Llama folder")] = "hf",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: RUN/hf)")] = None,
) -> None:
    """Export RUN for other tools: `--format hf` writes a folder transformers' LlamaForCausalLM loads."""
    if format not in EXPORT_FORMATS:
        typer.echo(f"error: --format {format}: expected one of {', '.join(EXPORT_FORMATS)}", err=True)
        raise typer.Exit(2)
    from aiinfra.checkpoint.export import export_hf

    try:
        written = export_hf(run, out or Path(run) / "hf")
    except (ConfigError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote a Hugging Face Llama folder to {written}")
