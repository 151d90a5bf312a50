"""Pipeline parallel: cut the model into stages and run them with a `torch.distributed.pipelining` schedule.

Stage i keeps a contiguous run of blocks; the first also keeps the embedding, the last the final norm and
output. Blocks keep their names ("layers.5" stays "layers.5"), so stage state dicts merge into the full one.
Interleaved 1F1B gives each rank two stages, i and i + pp (looped placement).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import _PipelineSchedule

from aiinfra.config import stages_per_rank
from aiinfra.models import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, balanced runs of block indices; earlier stages take the remainder (they also hold nothing else
    heavy but the embedding lookup, while the last stage carries the output projection)."""
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for stage in range(n_stages):
        size = base + (1 if stage < extra else 0)
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def stage_module(model: Transformer, stage: int, n_stages: int) -> Transformer:
    """A copy of `model` holding only what stage `stage` of `n_stages` runs."""
    part = copy.deepcopy(model)
    keep = {str(index) for index in split_layers(model.spec.n_layers, n_stages)[stage]}
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def build_stages(
    model: Transformer, pp_mesh: DeviceMesh, schedule: str, device: torch.device
) -> tuple[list[int], list[Transformer]]:
    """The stage indices this rank holds and their modules (not yet parallelized)."""
    pp_rank, pp_size = pp_mesh.get_local_rank(), pp_mesh.size()
    n_stages = pp_size * stages_per_rank(schedule)
    indices = list(range(pp_rank, n_stages, pp_size))
    return indices, [stage_module(model, index, n_stages) for index in indices]


def build_schedule(
    modules: list[nn.Module],
    indices: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    schedule: str,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> _PipelineSchedule:
    """A schedule over this rank's (parallelized) stage modules. `loss_fn` must divide by `microbatches` itself:
    the schedule's own scale_grads divides every accumulated gradient, including those of earlier steps of a
    gradient accumulation, so it is off."""
    group = pp_mesh.get_group()
    stages = [PipelineStage(module, index, n_stages, device, group=group) for module, index in zip(modules, indices)]
    schedule_class = SCHEDULES[schedule]
    if stages_per_rank(schedule) == 1:
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
