"""Single-process pieces of distributed/: layout validation, stage splits, bandwidth and timing arithmetic."""

from __future__ import annotations

import pytest

from aiinfra.config import ConfigError, load_config
from aiinfra.distributed.comm_bench import bus_factor, message_sizes
from aiinfra.distributed.launch import rendezvous_id, torchrun_command
from aiinfra.distributed.layout import ParallelLayout
from aiinfra.distributed.measure import is_comm_event, stragglers, union_seconds
from aiinfra.distributed.pipeline import split_layers
from aiinfra.train.faults import FaultSchedule


def test_layout_must_multiply_to_the_world_size() -> None:
    layout = ParallelLayout.from_config(load_config(None, ["parallel.dp_shard=2", "parallel.tp=2"]).parallel)
    assert layout.world_size == 4 and layout.dp_size == 2 and layout.describe() == "dp_shard=2 x tp=2"
    layout.validate(4)
    with pytest.raises(ConfigError, match="needs 4 processes .* the world has 2"):
        layout.validate(2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=3"], "parallel.tp=3 must divide model.n_heads=8"),
        (["parallel.pp=2", "model.n_layers=1", "model.tie_embeddings=false"], "needs 2 stages"),
        (["parallel.pp=2"], "set model.tie_embeddings=false"),
        (["parallel.pp=2", "model.tie_embeddings=false", "parallel.microbatches=3"], "must divide train.micro_batch"),
        (["parallel.cpu_offload=true"], "needs parallel.dp_shard > 1"),
        (["parallel.tp=2", "train.compile=true"], "not supported yet"),
        (["parallel.tp=2", "parallel.dp_replicate=2"], "DDP over a tensor-parallel model is not supported"),
        (["parallel.pp_schedule=zb"], "parallel.pp_schedule"),
    ],
)
def test_bad_parallel_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_stages_are_contiguous_and_balanced() -> None:
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(5, 4) == [[0, 1], [2], [3], [4]]


def test_nccl_tests_bus_bandwidth_factors() -> None:
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 2) == bus_factor("reduce_scatter", 2) == bus_factor("all_to_all", 2) == 0.5
    assert message_sizes(1024, 256 * 2**20, 4)[-1] == 256 * 2**20 and len(message_sizes(1024, 4096, 2)) == 3


def test_timing_helpers() -> None:
    assert union_seconds([(0, 10), (5, 20), (30, 40)]) == pytest.approx(30e-6)
    assert is_comm_event("gloo:all_reduce") and is_comm_event("nccl:all_gather") and not is_comm_event("aten::mm")
    assert stragglers([1.0, 1.0, 1.1, 2.0], ratio=1.25) == [3]


def test_launch_checks_the_layout_before_starting_workers() -> None:
    from aiinfra.distributed.launch import launch_train

    with pytest.raises(ConfigError, match="needs 4 processes .* launch with --nproc 4"):
        launch_train(None, ["parallel.dp_shard=2", "parallel.tp=2"], nproc=2)


def test_auto_layout_keeps_the_global_batch(monkeypatch) -> None:
    from aiinfra.distributed import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert launch.auto_layout(None, ["train.micro_batch=16"]) == (
        2,
        ["parallel.dp_replicate=2", "train.micro_batch=8", "parallel.measure_comm_every=0"],
    )
    # A measurement the user asked for is kept.
    assert launch.auto_layout(None, ["train.micro_batch=16", "parallel.measure_comm_every=5"]) == (
        2,
        ["parallel.dp_replicate=2", "train.micro_batch=8"],
    )
    assert launch.auto_layout(None, ["train.micro_batch=15"]) == (1, [])
    assert launch.auto_layout(None, ["parallel.tp=2"]) == (2, [])


def test_each_job_gets_its_own_rendezvous_id(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = tmp_path / "job.toml"
    config.write_text("[train]\nsteps = 10\n")
    first = rendezvous_id(config, ["run.dir=runs/a"])
    assert first == rendezvous_id(config, ["run.dir=runs/a"])  # every node of one job agrees
    assert first != rendezvous_id(config, ["run.dir=runs/b"]) != rendezvous_id(None, ["run.dir=runs/a"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert rendezvous_id(config, []) == "aiinfra-slurm-4242"
    command = torchrun_command(2, nnodes=2, rdzv_endpoint="h:1", rdzv_id=first)
    assert f"--rdzv-id={first}" in command


def test_fault_schedule_is_the_same_draw_on_every_rank(monkeypatch) -> None:
    fault = load_config(None, ["fault.random_kills=2", "fault.random_seed=11", "train.steps=8"]).fault
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FaultSchedule(fault, 2, 3, 8).kills == FaultSchedule(fault, 2, 3, 8).kills
    assert len(FaultSchedule(fault, 2, 3, 8).kills) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert FaultSchedule(fault, 2, 6, 8).kills == []  # attempts past fault.random_kills run clean
    with pytest.raises(ConfigError, match="fault.kill_rank=3: expected a rank below the world size 2"):
        FaultSchedule(load_config(None, ["fault.kill_step=1", "fault.kill_rank=3"]).fault, 2, 0, 300)
