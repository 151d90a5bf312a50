"""The launcher end to end: `aiinfra train --nproc`'s function, and two torchrun 'nodes' on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiinfra.config import ConfigError
from aiinfra.distributed.launch import launch_train, torchrun_command


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_on_loopback_train_one_model(
    base: list[str], references, tmp_path: Path, free_port: int
) -> None:
    """Two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1), one process each: DDP over both."""
    run_dir = tmp_path / "run"
    overrides = [*base, "parallel.dp_replicate=2", "train.micro_batch=4", f"run.dir={run_dir}"]
    endpoint = f"127.0.0.1:{free_port}"
    # Each node writes to a file, not a pipe: a pipe read only after the other node finishes can fill up and
    # stall its writer mid-collective, which hangs both nodes.
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "aiinfra.distributed.launch", "--nproc=1", "--nnodes=2", f"--node-rank={rank}"]
            + [f"--rdzv-endpoint={endpoint}", *(f"--set={item}" for item in overrides)],
            stdout=open(logs[rank], "w"),
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for node in nodes:
        node.wait(timeout=180)
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    # One run directory, written once, with the losses of one process on the same global batch.
    assert losses(run_dir) == pytest.approx([r["loss"] for r in references[True]["records"]], rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and (run_dir / "model.safetensors").stat().st_size > 0


def test_launch_train_runs_the_train_entry_point_in_each_worker(base: list[str], references, tmp_path: Path) -> None:
    """`launch_train` (what `aiinfra train --nproc 2` calls): FSDP on 2 local workers, a finished run dir."""
    run_dir = tmp_path / "run"
    status = launch_train(None, [*base, "parallel.dp_shard=2", "train.micro_batch=4", f"run.dir={run_dir}"], nproc=2)
    assert status == 0
    assert losses(run_dir) == pytest.approx([r["loss"] for r in references[True]["records"]], rel=1e-5)
    assert (run_dir / "model.safetensors").exists() and (run_dir / "loss_curve.png").exists()


def test_train_frees_every_process_group_before_the_worker_exits(base: list[str], run_worker, tmp_path: Path) -> None:
    """No gloo thread outlives `train()`: one left running into interpreter shutdown can abort a finished worker
    (SIGABRT, "terminate called without an active exception"), which torchrun counts as a failure. FSDP with
    checkpointing, so the mesh, the sharded parameters and the checkpoint manager all hold groups."""
    overrides = [*base, "parallel.dp_shard=2", "train.micro_batch=4", "checkpoint.every_steps=5",
                 f"run.dir={tmp_path / 'run'}"]
    run_worker(2, {"train": overrides, "out": str(tmp_path)}, tmp_path)
    for rank in range(2):
        threads = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert not [name for name in threads if "gloo" in name], threads


def test_bad_launch_settings_name_the_option() -> None:
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        torchrun_command(2, nnodes=2)
    with pytest.raises(ConfigError, match="--node-rank=2"):
        torchrun_command(2, nnodes=2, node_rank=2, rdzv_endpoint="h:1")


def test_ranks_that_do_not_share_the_data_cache_are_refused_not_left_waiting(
    small_corpus: Path, tmp_path: Path
) -> None:
    worker = Path(__file__).with_name("cache_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
         str(tmp_path), str(small_corpus)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "is not the folder rank 0 sees (rank 1)" in result.stderr, result.stderr[-3000:]
