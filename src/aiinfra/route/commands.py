"""`aiinfra route FLEET.toml` (the gateway) and `aiinfra route calibrate FLEET.toml` (a cascade's threshold): a
typer group registered by cli.py, whose default command is the gateway."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from aiinfra.config import ConfigError

if TYPE_CHECKING:  # the CLI imports this module at start-up: the gateway's modules load only to serve
    from aiinfra.route.fleet import FleetConfig


class RouteGroup(TyperGroup):
    """`aiinfra route FLEET.toml ...` runs the gateway (`serve`); `aiinfra route calibrate ...` the calibration."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


route_app = typer.Typer(cls=RouteGroup, no_args_is_help=True, add_completion=False,
                        help="The gateway over a fleet of OpenAI-compatible servers, and its cascade's calibration.")


def _fail(message: str) -> typer.Exit:
    """A user mistake: one clear line on stderr, exit status 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # every worker binds the same port; the kernel spreads connections over them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def serve_fleet(fleet: FleetConfig, sock: socket.socket) -> None:
    """Run one gateway process on `sock` until SIGINT or SIGTERM."""
    from aiohttp import web

    from aiinfra.route.app import build_app

    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # uvloop is optional: asyncio's own loop works, a little slower
        pass
    try:
        web.run_app(build_app(fleet), sock=sock, print=None, access_log=None,
                    handler_cancellation=True, loop=loop, shutdown_timeout=5)
    except web.GracefulExit:
        pass  # a second SIGTERM while shutting down (the process group's and the parent's): still a clean stop


@route_app.command("serve")
def route_command(
    fleet: Annotated[Path, typer.Argument(help="FLEET.toml: the gateway settings and the backend servers")],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="gateway processes sharing the port (SO_REUSEPORT)")] = 1,
) -> None:
    """An OpenAI-compatible gateway over many servers: routing, health checks, retries, hedging, failover."""
    from aiinfra.route.app import check_cache
    from aiinfra.route.fleet import load_fleet

    try:
        fleet_config = load_fleet(fleet)
        check_cache(fleet_config)
        sockets = [_listen(host, port, reuse_port=workers > 1) for _ in range(workers)]
    except ConfigError as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"--host {host} --port {port}: cannot listen there: {error.strerror or error}") from None
    pools = fleet_config.pools()
    typer.echo(f"routing {len(pools)} model(s) over {len(fleet_config.backend)} backend(s) with policy "
               f"{fleet_config.gateway.policy!r} on http://{host}:{port} ({workers} process(es))")
    if workers == 1:
        serve_fleet(fleet_config, sockets[0])
        return
    children = []
    for sock in sockets:
        pid = os.fork()
        if pid == 0:  # a worker: its own event loop, state and health checks on its own socket
            code = 0
            try:
                serve_fleet(fleet_config, sock)
            except BaseException as error:  # noqa: BLE001 - a worker must never return into the parent's code
                typer.echo(f"error: gateway process {os.getpid()} stopped: {error!r}", err=True)
                code = 1
            os._exit(code)
        children.append(pid)
        sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        failed += os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM)
    raise typer.Exit(1 if failed else 0)


@route_app.command("calibrate")
def calibrate_command(
    fleet: Annotated[Path, typer.Argument(help="FLEET.toml with the cascade to calibrate")],
    prompts: Annotated[Path, typer.Option(help='JSONL: {"prompt": "...", "reference": "..."} per line')],
    target_large_fraction: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="cost target: the share of requests sent to the large pool")
    ] = None,
    target_quality: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="quality target: a fraction of the large model's quality "
                                   "(needs references)")
    ] = None,
    cascade: Annotated[str | None, typer.Option(help="the cascade's model name (default: the only one)")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens each model answers (generate mode, quality)")] = 16,
    held_out: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="share of the prompts kept out of the fit to report on")
    ] = 0.3,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight to each pool")] = 4,
    output: Annotated[Path | None, typer.Option(help="also write the cascade's table with the threshold here")] = None,
    router: Annotated[
        str | None, typer.Option(help="learned: fit a model of the large model's gain on the prompts (needs "
                                 "references) and route by it; threshold: route by the statistic; default: the "
                                 "cascade's router")
    ] = None,
) -> None:
    """Pick a cascade's threshold for a cost or a quality target from prompts run through its pools."""
    import asyncio

    from aiinfra.route.calibrate import collect, find_cascade, fit, read_prompts, report, snippet, write_atomically
    from aiinfra.route.fleet import load_fleet

    try:
        if (target_large_fraction is None) == (target_quality is None):
            raise ConfigError("give exactly one of --target-large-fraction and --target-quality")
        if router not in (None, "threshold", "learned"):
            raise ConfigError(f"--router {router}: expected threshold or learned")
        fleet_config = load_fleet(fleet)
        chosen = find_cascade(fleet_config, cascade)
        labels = target_quality is not None or router == "learned"
        records = read_prompts(prompts, need_reference=labels)
        samples = asyncio.run(collect(fleet_config, chosen, records, max_tokens, [chosen.mode],
                                      with_quality=labels, concurrency=concurrency))
        calibration = fit(samples, chosen, target_large_fraction, target_quality, held_out, router=router)
    except ConfigError as error:
        raise _fail(str(error)) from None
    target = (f"a large fraction of {target_large_fraction}" if target_large_fraction is not None else
              f"{target_quality} of the large model's quality")
    typer.echo(report(calibration, target), err=True)
    table = snippet(chosen, calibration.threshold, calibration.router)
    typer.echo(table, nl=False)
    if output is not None:
        write_atomically(output, table)
