"""`aiinfra export RUN --format hf|onnx`: a plain typer-compatible function (registered by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aiinfra.config import ConfigError

EXPORT_FORMATS = ("hf", "onnx")


def export_command(
    run: Annotated[Path, typer.Argument(help="a finished run directory (model.safetensors, config.toml, tokenizer)")],
    format: Annotated[
        str, typer.Option("--format", help="hf: a Hugging Face Llama folder; onnx: model.onnx for ONNX Runtime")
    ] = "hf",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: RUN/<format>)")] = None,
) -> None:
    """Export RUN for other tools: a folder that transformers' LlamaForCausalLM (hf) or ONNX Runtime (onnx) loads."""
    if format not in EXPORT_FORMATS:
        typer.echo(f"error: --format {format}: expected one of {', '.join(EXPORT_FORMATS)}", err=True)
        raise typer.Exit(2)
    from aiinfra.checkpoint.export import export_hf, export_onnx

    export = export_hf if format == "hf" else export_onnx
    try:
        written = export(run, out or Path(run) / format)
    except (ConfigError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {'a Hugging Face Llama folder' if format == 'hf' else 'an ONNX model'} to {written}")
