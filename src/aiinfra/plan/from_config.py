"""The run `aiinfra train` would do with a training config, as the planner's spec, settings and layout.

The names are the trainer's (`aiinfra.config`): world size = dp_replicate x dp_shard x tp x pp; dp_shard > 1 is
FSDP2 (ZeRO-3, resharding after the forward unless `reshard_after_forward = false`); the global batch is
micro_batch x grad_accum x data-parallel ranks; a pipeline splits each micro-batch into `pp_microbatches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiinfra.config import Config, ConfigError, load_config
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.spec import ModelSpec


@dataclass(frozen=True)
class ConfiguredRun:
    """A training config translated for the planner."""

    spec: ModelSpec
    settings: TrainSettings
    layout: Layout
    tokens: float
    n_devices: int


def load_run_config(path: Path) -> Config:
    """A TOML config, or a run directory's resolved `config.toml`."""
    target = path / "config.toml" if path.is_dir() else path
    try:
        return load_config(target)
    except ConfigError as error:
        raise PlanError(f"--config={str(path)!r}: {error}") from None


def configured_run(config: Config) -> ConfiguredRun:
    """The spec, settings, layout and token count of the run `aiinfra train` does with `config`."""
    par, train = config.parallel, config.train
    global_batch = train.micro_batch * train.grad_accum * par.dp_size
    pipeline_micro = train.micro_batch // par.pp_microbatches if par.pp > 1 else train.micro_batch
    fsdp = par.dp_shard > 1
    bf16_params = train.dtype == "bf16" and par.mixed_precision == "fsdp"
    settings = TrainSettings(
        seq_len=train.seq_len, global_batch_seqs=global_batch,
        precision="bf16" if train.dtype == "bf16" else "fp32",
        attention_kernel="flash", dropout=False,
        # fp32 parameters and gradients under autocast; FSDP's bf16 policy keeps bf16 parameters, fp32 reduction.
        param_bytes=2 if bf16_params else 4, grad_bytes=4, grad_reduce_bytes=4,
        optimizer_bytes_per_param=12 if bf16_params else 8,
        reshard_after_forward=par.reshard_after_forward,
    )
    layout = Layout(
        tp=par.tp, pp=par.pp, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard,
        pp_schedule=par.pp_schedule, virtual_stages=2 if par.pp_schedule == "interleaved_1f1b" else 1,
        zero_stage=3 if fsdp else 0, micro_batch=max(1, pipeline_micro),
        recompute=par.activation_checkpoint, sequence_parallel=par.tp > 1,
    )
    return ConfiguredRun(config.model, settings, layout, float(train.steps) * global_batch * train.seq_len,
                         par.world_size)
