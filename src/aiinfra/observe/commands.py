"""`aiinfra dashboard`: the command (typer only at import time; the app is imported when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def dashboard_command(
    run_dirs: Annotated[list[Path] | None, typer.Argument(help="training run directories to follow")] = None,
    scrape: Annotated[
        list[str] | None,
        typer.Option("--scrape", help="a /metrics URL of `aiinfra serve` or `aiinfra route`; repeatable"),
    ] = None,
    host: Annotated[str, typer.Option(help="address the page listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port of the page (0: a free one)")] = 8050,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between polls of every source")] = 1.0,
) -> None:
    """A local web page with live plots of training runs, servers and the gateway."""
    from aiinfra.observe.dashboard import check_sources, serve_dashboard

    try:
        check_sources(run_dirs or [], scrape or [])
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        serve_dashboard(run_dirs or [], scrape or [], host, port, interval)
    except OSError as error:
        typer.echo(f"error: --host {host} --port {port}: {error.strerror or error}", err=True)
        raise typer.Exit(2) from None
