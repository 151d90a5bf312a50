"""torchrun worker for the multi-process checkpoint tests (gloo on CPU); parallelism straight from torch's APIs.

    torchrun --nproc-per-node=2 dist_worker.py save WORKDIR   FSDP on 2 ranks: train 2 steps, async save at step 2,
        train step 3 while it is written; then load into a fresh FSDP model and train step 3 again. Also saves
        WORKDIR/uneven, whose two data-parallel ranks are at different data positions.
    torchrun --nproc-per-node=4 dist_worker.py load WORKDIR   load the step-2 checkpoint into FSDP on 4 ranks and
        into FSDP 2 x TP 2, then train step 3 in each (without the RNG-dependent dropout: ranks draw differently).

Rank 0 writes WORKDIR/<mode>.pt: the full state each layout saved or loaded and the step-3 losses, for the test to
compare. Each layout feeds the same global batch of 4 windows, split over the data-parallel ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ckpt_helpers import build_model, full_state, make_state, train_step
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from aiinfra.checkpoint.manager import CheckpointManager, CheckpointPolicy
from aiinfra.distributed.runtime import release_mesh_groups, shutdown_process_groups

TP_PLAN = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


MESHES: list = []  # released at the end, so that every group is freed before the worker exits


def parallel_model(seed: int, dp: int, tp: int):
    """The tiny model under TP (if tp > 1) then FSDP over the data-parallel axis; (model, dp_rank, dp_group)."""
    model = build_model(seed)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    MESHES.append(mesh)
    if tp > 1:
        for block in model.layers.values():
            parallelize_module(block, mesh["tp"], TP_PLAN)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh["dp"].get_local_rank(), mesh["dp"].get_group()


def save(workdir: Path) -> dict:
    model, dp_rank, dp_group = parallel_model(seed=0, dp=2, tp=1)
    state = make_state(model, dp_rank, 2)
    manager = CheckpointManager(workdir / "ckpt", CheckpointPolicy(every_steps=2, async_save=True))
    for step in (1, 2):
        train_step(state, dp_group)
        manager.maybe_save(step, state)
    saved = full_state(state)
    loss3 = train_step(state, dp_group)  # runs while the step-2 checkpoint is being written
    manager.close()

    fresh, dp_rank, dp_group = parallel_model(seed=1, dp=2, tp=1)
    restored = make_state(fresh, dp_rank, 2)
    loaded_step = CheckpointManager(workdir / "ckpt").load_latest(restored)
    loaded = full_state(restored)
    resumed_loss3 = train_step(restored, dp_group)

    # The reference for other layouts: step 3 from the checkpoint without the RNG-dependent dropout.
    plain, dp_rank, dp_group = parallel_model(seed=2, dp=2, tp=1)
    plain_state = make_state(plain, dp_rank, 2)
    CheckpointManager(workdir / "ckpt").load_latest(plain_state)
    plain_loss3 = train_step(plain_state, dp_group, dropout=False)

    # Data-parallel ranks at different positions: resumable on 2 ranks, refused on any other count.
    if dist.get_rank() == 1:
        restored.data.next_batch()
    CheckpointManager(workdir / "uneven", CheckpointPolicy(async_save=False)).save(3, restored)

    # The time policy: rank 0's clock decides for every rank (a save that only some ranks join would hang).
    timed = CheckpointManager(workdir / "timed", CheckpointPolicy(every_seconds=1e-9, async_save=True))
    timed_saves = [timed.maybe_save(step, restored) for step in (4, 5)]
    timed.close()
    return {
        "timed_saves": timed_saves,
        "saved": saved, "loss3": loss3, "loaded_step": loaded_step, "loaded": loaded, "resumed_loss3": resumed_loss3,
        "plain_loss3": plain_loss3,
    }


def load(workdir: Path) -> dict:
    result = {}
    for name, dp, tp in (("fsdp4", 4, 1), ("fsdp2_tp2", 2, 2)):
        model, dp_rank, dp_group = parallel_model(seed=1, dp=dp, tp=tp)
        state = make_state(model, dp_rank, dp)
        result[f"{name}_step"] = CheckpointManager(workdir / "ckpt").load_latest(state)
        result[f"{name}_loaded"] = full_state(state)
        result[f"{name}_loss3"] = train_step(state, dp_group, dropout=False)
    return result


def main(mode: str, workdir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = save(workdir) if mode == "save" else load(workdir)
        if dist.get_rank() == 0:
            torch.save(result, workdir / f"{mode}.pt")
        dist.barrier()
    finally:
        for mesh in MESHES:
            release_mesh_groups(mesh)
        shutdown_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
