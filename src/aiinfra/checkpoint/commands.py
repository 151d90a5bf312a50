"""`aiinfra export RUN --format hf|onnx [--int8]`: a plain typer-compatible function (registered by cli.py)."""

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
    int8: Annotated[bool, typer.Option(
        help="onnx only: int8 weights per output channel (ONNX Runtime dynamic quantization), about 1/4 the bytes")
    ] = False,
) -> None:
    """Export RUN for other tools: a folder that transformers' LlamaForCausalLM (hf) or ONNX Runtime (onnx) loads."""
    if format not in EXPORT_FORMATS:
        typer.echo(f"error: --format {format}: expected one of {', '.join(EXPORT_FORMATS)}", err=True)
        raise typer.Exit(2)
    if int8 and format != "onnx":
        typer.echo("error: --int8 is for --format onnx: transformers reads int8 weights only through a quantization "
                   "library's own format (bitsandbytes, compressed-tensors), which we do not write", err=True)
        raise typer.Exit(2)
    from aiinfra.checkpoint.export import export_hf, export_onnx

    try:
        if format == "hf":
            written = export_hf(run, out or Path(run) / "hf")
        else:
            written = export_onnx(run, out or Path(run) / ("onnx-int8" if int8 else "onnx"), int8=int8)
    except (ConfigError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    what = "a Hugging Face Llama folder" if format == "hf" else f"an {'int8 ' if int8 else ''}ONNX model"
    typer.echo(f"wrote {what} to {written}")
