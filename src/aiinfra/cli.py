"""The `aiinfra` command line. Thin: each command parses its arguments and calls one function of a pillar."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from aiinfra.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)


def fail(message: str) -> typer.Exit:
    """A user mistake: one clear line on stderr, exit status 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.command("train")
def train_command(
    config: Annotated[Path | None, typer.Argument(help="TOML config (default: the embedded tiny model)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="section.key=value, repeatable")] = None,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="processes on this node (default: the fastest layout here)")
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="nodes in the job (torchrun c10d rendezvous)")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="this node's rank, 0..nnodes-1")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous, same on every node")] = None,
    max_restarts: Annotated[int, typer.Option(min=0, help="restart all workers this many times on a failure")] = 0,
    rdzv_id: Annotated[
        str | None, typer.Option(help="job id at the rendezvous (default: SLURM_JOB_ID, else a hash of the command)")
    ] = None,
) -> None:
    """Train a model; with no arguments, the embedded default on this interpreter's standard library."""
    from aiinfra.config import load_config

    overrides = overrides or []
    try:  # a mistake in the file or a --set item is named before torch loads, in a fraction of a second
        load_config(config, overrides)
    except ConfigError as error:
        raise fail(str(error)) from None

    from aiinfra.checkpoint.commit import CheckpointError
    from aiinfra.distributed.launch import auto_layout, launch_train
    from aiinfra.train import train

    try:
        inside_torchrun = "WORLD_SIZE" in os.environ
        if not inside_torchrun:
            if nproc is None and nnodes == 1:
                nproc, extra = auto_layout(config, overrides)
                overrides = [*overrides, *extra]
            if nproc > 1 or nnodes > 1 or max_restarts:
                raise typer.Exit(launch_train(config, overrides, nproc, nnodes, node_rank, rdzv_endpoint, max_restarts,
                                              rdzv_id))
        result = train(load_config(config, overrides))
    except ConfigError as error:
        raise fail(str(error)) from None
    except CheckpointError as error:  # not a usage mistake (exit 2) but a run that must not go on: one line, exit 1
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if result is None:  # a worker other than rank 0: rank 0 reports
        return
    typer.echo(f"\nsample:\n{result.sample}\n")
    typer.echo(
        f"done in {result.wall_time_s:.0f} s: validation loss {result.final_val_loss:.3f} nats/token "
        f"(unigram entropy {result.unigram_entropy_nats:.3f}), {result.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * result.mfu:.1f}%\nrun saved to {result.run_dir}; try: aiinfra generate {result.run_dir} "
        f'--prompt "def "'
    )


@app.command("generate")
def generate_command(
    run: Annotated[Path, typer.Argument(help="a finished run directory")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "def ",
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.7,
    top_k: Annotated[int, typer.Option(min=0, help="sample among the k likeliest (0: all)")] = 40,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
) -> None:
    """Sample text from a trained run."""
    from aiinfra.checkpoint.run_files import check_run_dir

    try:
        check_run_dir(run)  # a wrong directory is named before torch loads
        from aiinfra.train.generate import generate

        typer.echo(generate(run, prompt, max_tokens, temperature, top_k, seed))
    except (ConfigError, ValueError) as error:
        raise fail(str(error)) from None


def _mount_pillars() -> None:
    """Commands defined beside their pillar; each module imports only typer at the top, so start-up stays fast."""
    from aiinfra.checkpoint.commands import export_command
    from aiinfra.observe.commands import dashboard_command
    from aiinfra.plan.commands import plan_app
    from aiinfra.route.commands import route_app
    from aiinfra.serve.commands import bench_serve_command, serve_command

    app.add_typer(plan_app, name="plan", help="Plan GPU/TPU clusters: memory, step time, MFU, cost, goodput.")
    app.command("serve")(serve_command)
    app.command("export")(export_command)
    app.add_typer(route_app, name="route")
    app.command("dashboard")(dashboard_command)
    bench_app = typer.Typer(no_args_is_help=True, help="Measured benchmarks with the field's own definitions.")
    bench_app.command("serve")(bench_serve_command)
    bench_app.command("comm")(bench_comm_command)
    app.add_typer(bench_app, name="bench")


def bench_comm_command(
    nproc: Annotated[int, typer.Option(min=2, help="local worker processes")] = 2,
    op: Annotated[
        list[str] | None, typer.Option("--op", help="all_reduce, all_gather, reduce_scatter, all_to_all; repeatable")
    ] = None,
    min_bytes: Annotated[int, typer.Option(min=4, help="smallest message")] = 1024,
    max_bytes: Annotated[int, typer.Option(min=4, help="largest message")] = 256 * 2**20,
    step_factor: Annotated[int, typer.Option(min=2, help="each size is this times the previous")] = 4,
    backend: Annotated[str, typer.Option(help="auto, gloo or nccl")] = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """All-reduce, all-gather, reduce-scatter and all-to-all with nccl-tests' algbw and busbw."""
    from aiinfra.distributed.comm_bench import OPS
    from aiinfra.distributed.launch import bench_comm

    unknown = sorted(set(op or []) - set(OPS))
    if unknown:
        raise fail(f"--op {', '.join(unknown)}: expected one of {', '.join(OPS)}")
    raise typer.Exit(bench_comm(nproc, op, min_bytes, max_bytes, step_factor, backend, json_path))


_mount_pillars()


@app.callback()
def main() -> None:
    """Train, serve, plan and watch language models."""
