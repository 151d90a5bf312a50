"""Start training (or the communication benchmark) on several processes through torchrun.

`aiinfra train --nproc N ...` calls `launch_train`, which runs `python -m torch.distributed.run` with the same
train command line in every worker; each worker finds torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...)
and joins the process group. The same entry point runs under a user's own torchrun on a cluster:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m aiinfra train CONFIG --set parallel.dp_shard=16
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import xxhash

from aiinfra.config import ConfigError, load_config
from aiinfra.distributed.layout import ParallelLayout


def rendezvous_id(config: Path | None, overrides: list[str]) -> str:
    """An id the same on every node of one job and different for another job on the same endpoint: the batch
    scheduler's job id where there is one (SLURM_JOB_ID), else a hash of the config file's content and the
    overrides, which every node of a job runs alike."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        return f"aiinfra-slurm-{job_id}"
    digest = xxhash.xxh3_64()
    if config is not None:
        try:
            digest.update(Path(config).read_bytes())
        except OSError:
            raise ConfigError(f"config file {str(config)!r} cannot be read") from None
    for item in overrides:
        digest.update(item.encode() + b"\0")
    return f"aiinfra-{digest.hexdigest()}"


def torchrun_command(
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    rdzv_id: str = "aiinfra",
) -> list[str]:
    """The `python -m torch.distributed.run ...` prefix for these launch settings; `rdzv_id` names the job at a
    c10d rendezvous endpoint (see `rendezvous_id`)."""
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc={nproc} --nnodes={nnodes}: both must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank={node_rank}: expected 0..{nnodes - 1} for --nnodes={nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError(f"--nnodes={nnodes}: give --rdzv-endpoint HOST:PORT (the same on every node)")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if rdzv_endpoint:
        # c10d rendezvous: the first node to arrive hosts the store at the endpoint; node ranks are assigned there.
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    else:
        command.append("--standalone")  # one node, a free port chosen by torchrun
    # Workers inherit this terminal: rank 0's progress bar and final lines read as in a one-process run, and
    # machine-readable last lines (a benchmark's JSON) carry no "[rank0]:" prefix. The other ranks print nothing.
    command += [f"--max-restarts={max_restarts}", "--role=rank"]
    return command


def worker_env(nproc: int) -> dict[str, str]:
    """The environment for torchrun and its workers: the machine's cores split among the workers unless the user
    chose OMP_NUM_THREADS, and a rendezvous store of their own for every attempt."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Sharing the rendezvous TCP store with the workers made gloo restarts (--max-restarts) unreliable on torch
    # 2.13: restarted workers reached the dead peer's old address ("Gloo connectFullMesh failed") or hung.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def auto_layout(config: Path | None, overrides: list[str]) -> tuple[int, list[str]]:
    """The fastest layout for this machine when the user set none: (processes, extra overrides).

    One process per GPU. On a CPU with several cores: one single-threaded DDP process per core, with the
    per-process micro-batch divided so that the global batch (and so the training) is unchanged. Measured by
    bench/scaling.py on the shared 2-core machine (docs/distributed.md): DDP on 2 processes gave several times
    the tokens/s of one process with 2 threads, whose OpenMP threads stall whenever a core is taken by another
    job. A layout the user set decides the process count itself; a batch that does not divide stays on one.
    """
    import torch

    loaded = load_config(config, overrides)
    count = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    micro_batch, world_size = loaded.train.micro_batch, loaded.parallel.world_size
    if world_size > 1:
        return world_size, []
    if count < 2 or micro_batch % count:
        return 1, []
    extra = [f"parallel.dp_replicate={count}", f"train.micro_batch={micro_batch // count}"]
    if "measure_comm_every" not in loaded.parallel.model_fields_set:
        # Profiling communication is for layout studies; in a default run it costs time and kineto prints lines.
        extra.append("parallel.measure_comm_every=0")
    return count, extra


def launch_train(
    config: Path | None,
    overrides: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    rdzv_id: str | None = None,
) -> int:
    """Run `aiinfra train CONFIG --set ...` in `nproc` workers on this node (of `nnodes`); return the exit status.

    The config is checked here first, so a mistake is reported once rather than by every worker. With no
    parallel degrees set, every process is a data-parallel replica (DDP). `rdzv_id` defaults to `rendezvous_id`.
    """
    world_size = nproc * nnodes
    layout = ParallelLayout.from_config(load_config(config, overrides).parallel)
    if layout.world_size == 1 and world_size > 1:
        overrides = [*overrides, f"parallel.dp_replicate={world_size}"]
    else:
        layout.validate(world_size)
    train_args = ["-m", "aiinfra", "train", *([str(config)] if config else [])]
    for item in overrides:
        train_args += ["--set", item]
    rdzv_id = rdzv_id or rendezvous_id(config, overrides)
    command = torchrun_command(nproc, nnodes, node_rank, rdzv_endpoint, max_restarts, rdzv_id) + train_args
    return subprocess.call(command, env=worker_env(nproc))


def bench_comm(
    nproc: int = 2,
    ops: list[str] | None = None,
    min_bytes: int = 1024,
    max_bytes: int = 256 * 2**20,
    step_factor: int = 4,
    backend: str = "auto",
    json_path: Path | None = None,
) -> int:
    """`aiinfra bench comm`: the collectives benchmark on `nproc` local workers (or in this torchrun job)."""
    args = [f"--min-bytes={min_bytes}", f"--max-bytes={max_bytes}", f"--step-factor={step_factor}"]
    args += [f"--backend={backend}", *(f"--op={op}" for op in ops or [])]
    if json_path:
        args.append(f"--json={json_path}")
    module = ["-m", "aiinfra.distributed.comm_bench", *args]
    if "WORLD_SIZE" in os.environ:  # already a torchrun worker: run here
        return subprocess.call([sys.executable, *module])
    return subprocess.call(torchrun_command(nproc) + module, env=worker_env(nproc))


def main(argv: list[str] | None = None) -> int:
    """`python -m aiinfra.distributed.launch --nproc N [--nnodes ..] [CONFIG] [--set k=v ...]`: as `aiinfra train`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", nargs="?", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint")
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--rdzv-id")
    args = parser.parse_args(argv)
    try:
        return launch_train(
            args.config, args.overrides, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts,
            args.rdzv_id,
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
