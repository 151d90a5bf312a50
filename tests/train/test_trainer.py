import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aiinfra.checkpoint.run_dir import load_run
from aiinfra.config import ConfigError, load_config
from aiinfra.data.dataset import prepare_dataset
from aiinfra.data.sampler import eval_batches
from aiinfra.train import Trainer, train
from aiinfra.train.trainer import warmup_cosine


def test_fifty_step_run_learns_and_writes_a_self_contained_run_dir(tiny_config) -> None:
    result = train(tiny_config)
    run_dir = tiny_config.run.dir
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 51))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result.final_val_loss < result.unigram_entropy_nats
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [25, 50]
    for name in ("model.safetensors", "config.toml", "tokenizer.json", "loss_curve.png", "summary.json"):
        assert Path(run_dir, name).stat().st_size > 0
    # The run directory alone reproduces the model: same config, same validation loss.
    run = load_run(run_dir)
    assert run.config == tiny_config
    with torch.no_grad():
        losses = [
            F.cross_entropy(run.model(inputs).flatten(0, 1), targets.flatten()).item()
            for inputs, targets in eval_batches(
                prepare_dataset(str(tiny_config.data.corpus), 512, 0.2, Path(tiny_config.data.cache_dir)).val, 64, 8, 2
            )
        ]
    assert sum(losses) / len(losses) == pytest.approx(result.final_val_loss, rel=1e-5)


def test_same_seed_gives_identical_losses(tiny_config, tmp_path) -> None:
    config = tiny_config.model_copy(deep=True)
    config.train.steps, config.train.warmup_steps, config.train.eval_every = 5, 1, 0
    config.run.sample_tokens = 0
    losses = []
    for index in range(2):
        config.run.dir = str(tmp_path / f"run{index}")
        trainer = Trainer(config)
        losses.append([trainer.train_step()["loss"] for _ in range(5)])
    assert losses[0] == losses[1]


def test_gradient_accumulation_equals_the_large_batch(tiny_config, tmp_path) -> None:
    def first_steps(micro_batch: int, grad_accum: int) -> list[float]:
        config = tiny_config.model_copy(deep=True)
        config.train.micro_batch, config.train.grad_accum, config.run.dir = micro_batch, grad_accum, None
        trainer = Trainer(config, run_dir=tmp_path / f"{micro_batch}x{grad_accum}")
        return [trainer.train_step()["loss"] for _ in range(3)]

    assert first_steps(8, 1) == pytest.approx(first_steps(2, 4), rel=1e-5)


def test_finished_run_dir_is_not_overwritten(tiny_config) -> None:
    config = tiny_config.model_copy(deep=True)
    config.train.steps, config.train.warmup_steps, config.run.sample_tokens = 2, 1, 0
    train(config)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        Trainer(config)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    values = [warmup_cosine(step, 10, 100, 0.1) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[100] == pytest.approx(0.1) and math.isclose(values[55], 0.55, rel_tol=1e-9)


def test_activation_checkpointing_changes_memory_not_numerics(tiny_config, tmp_path) -> None:
    def first_steps(mode: str) -> list[float]:
        config = tiny_config.model_copy(deep=True)
        config.parallel.activation_checkpoint, config.run.dir = mode, None
        trainer = Trainer(config, run_dir=tmp_path / mode)
        return [trainer.train_step()["loss"] for _ in range(3)]

    plain = first_steps("none")
    assert first_steps("full") == pytest.approx(plain, rel=1e-6)
    assert first_steps("selective") == pytest.approx(plain, rel=1e-6)


def test_a_multi_process_layout_without_torchrun_says_how_to_launch(tiny_config) -> None:
    config = tiny_config.model_copy(deep=True)
    config.parallel.dp_shard = 2
    with pytest.raises(ConfigError, match="--nproc 2"):
        Trainer(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
        ("checkpoint.keep_last=-2", "checkpoint.keep_last"),
        ("checkpoint.every_seconds=-1", "checkpoint.every_seconds"),
        ("fault.kill_step=400", "fault.kill_step=400 is past train.steps=300"),
        ("parallel.collective_timeout_s=0", "parallel.collective_timeout_s"),
    ],
)
def test_checkpoint_and_fault_settings_are_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_fault_rank_outside_the_world_is_refused(tiny_config) -> None:
    config = tiny_config.model_copy(deep=True)
    config.fault.kill_step, config.fault.kill_rank = 3, 1
    with pytest.raises(ConfigError, match="fault.kill_rank=1"):
        Trainer(config)
