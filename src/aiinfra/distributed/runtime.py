"""What the trainer talks to: one `Runtime` per process and one `ModelRunner` per model.

`Runtime` is a single process; `DistributedRuntime` is one rank of many (process group from torchrun's
environment, the DeviceMesh, data-parallel rank, rank-0-first preparation, loss averaging, per-rank step
measurements). A `ModelRunner` runs forward and backward of the parallelized model, or a pipeline schedule
over this rank's stages, and knows how to clip gradients and export full weights. The trainer calls the same
methods either way, so no rank logic leaks into it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from aiinfra.config import Config, ConfigError, stages_per_rank
from aiinfra.distributed.layout import ParallelLayout
from aiinfra.distributed.measure import CommCompute, StepProfiler, peak_memory_bytes, stragglers
from aiinfra.distributed.parallelize import parallelize
from aiinfra.distributed.pipeline import build_schedule, build_stages
from aiinfra.models import Transformer, model_from_state_dict

LossFromLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager]


def clip_grad_norm(
    parameters: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clip the global gradient norm over all ranks' shards (DTensor) and pipeline stages; return the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sums the squares of the shards over the mesh
    if pp_group is not None:
        # Each stage holds different parameters: the global norm is the root of the summed squares.
        total = total.pow(2)
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


class ModelRunner:
    """Forward and backward of one module (plain, DDP, FSDP and/or TP)."""

    def __init__(self, module: nn.Module, model: Transformer, autocast: Autocast, loss_from_logits: LossFromLogits):
        self.module = module
        self.model = model  # the unwrapped model (FSDP and TP modify it in place; DDP wraps it)
        self.autocast = autocast
        self.loss_from_logits = loss_from_logits
        self.pp_group: dist.ProcessGroup | None = None

    @property
    def root(self) -> nn.Module:
        """The module whose parameters the optimizer steps."""
        return self.model

    def parameters(self) -> list[nn.Parameter]:
        return list(self.root.parameters())

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch (no backward)."""
        with self.autocast():
            logits = self.module(inputs)
        return self.loss_from_logits(logits, targets)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Backward of `scale` x the batch loss; returns that scaled loss (None on ranks that compute no loss)."""
        loss = self.loss(inputs, targets) * scale
        loss.backward()
        return loss.detach()

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce/reduce-scatter on all but the last accumulated micro-batch."""
        if isinstance(self.module, DistributedDataParallel) and not enabled:
            with self.module.no_sync():
                yield
            return
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(enabled)
        yield

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.parameters(), max_norm, self.pp_group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded, in rank 0's CPU memory; empty elsewhere (a collective: all ranks call it)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class PipelineRunner(ModelRunner):
    """A pipeline schedule over this rank's stages (each parallelized with the data/tensor axes)."""

    def __init__(
        self,
        stages: list[nn.Module],
        schedule_for: Callable,
        microbatches: int,
        has_first: bool,
        has_last: bool,
        **kwargs: Any,
    ):
        stage_list = nn.ModuleList(stages)
        super().__init__(module=stage_list, model=stage_list, **kwargs)
        self.stages = stages
        self.microbatches = microbatches
        self.has_first, self.has_last = has_first, has_last
        self.loss_scale = 1.0
        self.schedule = schedule_for(self._stage_loss)

    def _stage_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Micro-batches are equal in size: each contributes 1/microbatches of the batch's mean loss.
        return self.loss_from_logits(logits, targets) * (self.loss_scale / self.microbatches)

    def _run(self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        with self.autocast():
            run(*args, target=targets if self.has_last else None, losses=losses)
        return torch.stack(losses).sum().detach() if self.has_last else None

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        self.loss_scale = 1.0
        return self._run(self.schedule.eval, inputs, targets)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor | None:
        self.loss_scale = scale
        return self._run(self.schedule.step, inputs, targets)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        # Each schedule step reduces gradients once, after its last pipeline micro-batch; with gradient
        # accumulation every accumulated step does so (correct, if not the least communication).
        yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's stages, unsharded, on its CPU: the runtime merges the stages on rank 0."""
        state: dict[str, torch.Tensor] = {}
        for stage in self.stages:
            state.update(get_model_state_dict(stage, options=StateDictOptions(full_state_dict=True)))
        return {name: tensor.cpu() for name, tensor in state.items()}


class SilentLogger:
    """The step logger of ranks other than the main one: they train, the main rank reports."""

    def print(self, message: str) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Runtime:
    """A single process: every hook is the identity, and the model runs as built."""

    rank, world_size, dp_rank, dp_size, is_main = 0, 1, 0, 1, True

    def __init__(self, config: Config, device: torch.device):
        self.config = config
        self.device = device
        self.layout = ParallelLayout.from_config(config.parallel)

    def describe(self) -> str:
        return "1 process"

    def main_first(self) -> contextlib.AbstractContextManager:
        """Run a block on rank 0 first (say, to fill a cache), then on the others."""
        return contextlib.nullcontext()

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        return value

    def build_runner(self, model: Transformer, autocast: Autocast, loss_from_logits: LossFromLogits) -> ModelRunner:
        if self.config.parallel.mixed_precision == "fsdp":
            raise ConfigError("parallel.mixed_precision=fsdp needs FSDP: launch with `aiinfra train --nproc N`")
        return ModelRunner(parallelize(model, None, self.config, self.device), model, autocast, loss_from_logits)

    def mean_loss(self, local: torch.Tensor | None) -> float:
        """The loss averaged over the ranks that computed one."""
        return local.item()

    def export_model(self, runner: ModelRunner) -> Transformer | None:
        """The full model on the main rank (None elsewhere): for saving and sampling."""
        return runner.model

    def measure_step(self, step: int) -> contextlib.AbstractContextManager:
        """Profile this step when it is due; a single process has no communication to measure."""
        return contextlib.nullcontext()

    def step_record(self, step_time_s: float, measured: Any, compute_s: float, energy_j: float) -> dict[str, Any]:
        """Per-rank fields for the step's record (lists indexed by rank): peak memory and this step's compute
        time; the job's energy this step (-1: not measured)."""
        return {"rank_peak_memory_bytes": [peak_memory_bytes(self.device)], "rank_compute_s_step": [compute_s],
                "energy_j": energy_j}

    def close(self) -> None:
        pass


class DistributedRuntime(Runtime):
    """One rank of a torchrun job: process group, mesh, data-parallel coordinates, per-rank measurements."""

    def __init__(self, config: Config):
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and config.train.device in ("auto", "cuda")
        device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        super().__init__(config, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = config.parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=config.parallel.collective_timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.layout.validate(self.world_size)
        self.mesh, dp_mesh = self.layout.build_mesh(device.type)
        self.dp_rank, self.dp_size = dp_mesh.get_local_rank(), dp_mesh.size()

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.layout.describe()}, {dist.get_backend()})"

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def share(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def build_runner(self, model: Transformer, autocast: Autocast, loss_from_logits: LossFromLogits) -> ModelRunner:
        par = self.config.parallel
        if par.pp == 1:
            module = parallelize(model, self.mesh, self.config, self.device)
            return ModelRunner(module, model, autocast, loss_from_logits)
        pp_mesh = self.mesh["pp"]
        indices, stages = build_stages(model, pp_mesh, par.pp_schedule, self.device)
        n_stages = pp_mesh.size() * stages_per_rank(par.pp_schedule)
        stages = [parallelize(stage, self.mesh, self.config, self.device) for stage in stages]

        def schedule_for(loss_fn: LossFromLogits):
            return build_schedule(
                stages, indices, n_stages, pp_mesh, par.pp_schedule, par.pp_microbatches, loss_fn, self.device
            )

        runner = PipelineRunner(
            stages,
            schedule_for,
            microbatches=par.pp_microbatches,
            has_first=0 in indices,
            has_last=n_stages - 1 in indices,
            autocast=autocast,
            loss_from_logits=loss_from_logits,
        )
        runner.pp_group = pp_mesh.get_group()
        return runner

    def mean_loss(self, local: torch.Tensor | None) -> float:
        # [sum, count] over all ranks: ranks without a loss (early pipeline stages) add zeros; tensor-parallel
        # peers hold the same loss, so averaging over them changes nothing.
        pair = torch.zeros(2, dtype=torch.float64, device=self.device)
        if local is not None:
            pair[0], pair[1] = local.double(), 1.0
        dist.all_reduce(pair)
        return (pair[0] / pair[1]).item()

    def export_model(self, runner: ModelRunner) -> Transformer | None:
        state = runner.full_state_dict()
        if self.config.parallel.pp > 1:
            state = self._merge_stages(state)
        if not self.is_main:
            return None
        return model_from_state_dict(self.config.model, state, self.device)

    def _merge_stages(self, stage_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All stages' parameters on rank 0. One copy of each stage is enough: its first data-parallel and
        tensor-parallel rank sends it."""
        tp_rank = self.mesh["tp"].get_local_rank()
        pieces: list[Any] = [None] * self.world_size if self.is_main else None
        dist.gather_object(stage_state if self.dp_rank == 0 and tp_rank == 0 else None, pieces, dst=0)
        return {name: tensor for piece in pieces or [] if piece for name, tensor in piece.items()}

    def measure_step(self, step: int) -> contextlib.AbstractContextManager:
        every = self.config.parallel.measure_comm_every
        # Step 1 pays one-off costs (allocations, lazy FSDP init): never profile it.
        if every and step > 1 and step % every == 0:
            return StepProfiler()
        return contextlib.nullcontext()

    def step_record(self, step_time_s: float, measured: Any, compute_s: float, energy_j: float) -> dict[str, Any]:
        comm = measured.result if isinstance(measured, StepProfiler) else CommCompute(-1.0, -1.0)
        mine = torch.tensor(
            [step_time_s, comm.comm_s, comm.compute_s, float(peak_memory_bytes(self.device)), compute_s, energy_j],
            dtype=torch.float64,
            device=self.device,
        )
        fields = len(mine)
        everyone = torch.empty(self.world_size * fields, dtype=torch.float64, device=self.device)
        # torch 2.13 renamed all_gather_into_tensor (deprecated, warns every call) to all_gather_single.
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(everyone, mine)
        columns = everyone.view(self.world_size, fields).cpu().T.tolist()
        step_times, comm_s, compute_s, peak, step_compute_s, energy = columns
        record: dict[str, Any] = {
            "rank_step_time_s": step_times,
            "rank_peak_memory_bytes": [int(value) for value in peak],
            # Every step, one float per rank: the straggler detector's input (observe/straggler.py).
            "rank_compute_s_step": step_compute_s,
            "energy_j": sum(energy) if min(energy) >= 0 else -1.0,
        }
        if comm_s[0] >= 0:
            record |= {
                "rank_comm_s": comm_s,
                "rank_compute_s": compute_s,
                "comm_fraction": sum(comm_s) / sum(step_times),
                # Synchronous training evens out step times (everyone waits for the slowest), so a straggler
                # shows in the compute time.
                "straggler_ranks": stragglers(compute_s, self.config.parallel.straggler_ratio),
            }
        return record

    def close(self) -> None:
        """Destroy every process group and free them now (see shutdown_process_groups); drop the trainer (model,
        optimizer, checkpoint manager) first."""
        release_mesh_groups(self.mesh)
        shutdown_process_groups()


def release_mesh_groups(mesh: DeviceMesh) -> None:
    """Drop a mesh's references to its process groups (and its submeshes'), which c10d still holds until they are
    destroyed. DTensor's sharding-propagation caches keep meshes alive for the life of the process, and with them
    every group a mesh registered."""
    getattr(mesh, "_pg_registry", {}).clear()


def shutdown_process_groups() -> None:
    """Destroy every process group and free the ones nothing references any more, threads included.

    `destroy_process_group` only unregisters the groups: a gloo group's threads run until its last Python reference
    (a DeviceMesh, FSDP's DTensors, a checkpoint manager's groups) is collected. Left running into interpreter
    shutdown, they can abort a worker whose work is done ("terminate called without an active exception", SIGABRT),
    and torchrun counts that as a failure. References in cycles need the collection.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def make_runtime(config: Config, device: torch.device) -> Runtime:
    """A DistributedRuntime under torchrun (even with one process: FSDP then works on one GPU), else Runtime."""
    if "WORLD_SIZE" not in os.environ and config.parallel.world_size > 1:
        raise ConfigError(
            f"parallel layout needs {config.parallel.world_size} processes: run `aiinfra train --nproc "
            f"{config.parallel.world_size}` (or under torchrun)"
        )
    return DistributedRuntime(config) if "WORLD_SIZE" in os.environ else Runtime(config, device)
