"""Training's /metrics on one process: served while it trains, found through observe.json, off with port -1;
TensorBoard event files only where tensorboard is installed, and a clear error where it is not."""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from aiinfra.config import Config, ConfigError
from aiinfra.distributed.runtime import SilentLogger
from aiinfra.observe.dashboard_data import parse_samples, total
from aiinfra.observe.train_metrics import read_observe_file
from aiinfra.train import Trainer


def trainer_for(config: Config, tmp_path, **observe) -> Trainer:
    config = config.model_copy(deep=True)
    for key, value in observe.items():
        setattr(config.observe, key, value)
    return Trainer(config, run_dir=tmp_path / "run")


def test_prometheus_training_metrics_served_while_training(tiny_config: Config, tmp_path) -> None:
    trainer = trainer_for(tiny_config, tmp_path, metrics_port=0)
    try:
        line = trainer.observer.start(0, 0, trainer.peak.flops_per_s)
        info = read_observe_file(trainer.run_dir)
        assert info["metrics_url"] in line and info["predicted_step_time_s"] > 0 and "cpu" in info["energy"]
        for _ in range(3):
            trainer.run_step(SilentLogger())
        samples = parse_samples(httpx.get(info["metrics_url"], timeout=10).text)
    finally:
        trainer.observer.close()
    assert total(samples, "aiinfra_train_step") == 3
    assert total(samples, "aiinfra_train_step_time_seconds_count") == 3
    assert total(samples, "aiinfra_train_tokens_total") == 3 * trainer.tokens_per_step
    assert total(samples, "aiinfra_train_predicted_step_time_seconds") == pytest.approx(info["predicted_step_time_s"])
    assert total(samples, "aiinfra_train_peak_memory_bytes", rank="0") > 0
    assert 0 < total(samples, "aiinfra_train_mfu_ratio") < 1
    assert total(samples, "aiinfra_train_straggler_rank") == -1  # one process: never a straggler


def test_prometheus_training_metrics_off_with_port_minus_one(tiny_config: Config, tmp_path) -> None:
    trainer = trainer_for(tiny_config, tmp_path, metrics_port=-1)
    line = trainer.observer.start(0, 0, trainer.peak.flops_per_s)
    assert trainer.observer.metrics is None and "metrics off" in line
    assert read_observe_file(trainer.run_dir)["metrics_url"] is None


def test_tensorboard_event_files_or_a_clear_error(tiny_config: Config, tmp_path) -> None:
    trainer = trainer_for(tiny_config, tmp_path, metrics_port=-1, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="observe.tensorboard=true: the tensorboard package is not installed"):
            trainer.observer.start(0, 0, trainer.peak.flops_per_s)
        return
    trainer.observer.start(0, 0, trainer.peak.flops_per_s)
    trainer.run_step(SilentLogger())
    trainer.observer.close()
    assert list((trainer.run_dir / "tensorboard").glob("events.out.tfevents.*"))
