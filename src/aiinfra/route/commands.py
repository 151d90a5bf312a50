"""`aiinfra route FLEET.toml`: a plain typer-compatible function (registered by cli.py)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from aiinfra.config import ConfigError

if TYPE_CHECKING:  # the CLI imports this module at start-up: the gateway's modules load only to serve
    from aiinfra.route.fleet import FleetConfig


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
