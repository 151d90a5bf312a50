"""NVML energy: joules per step and per token on a CUDA device; elsewhere no figure, and a reason."""

from __future__ import annotations

import pytest
import torch

from aiinfra.config import Config
from aiinfra.distributed.runtime import SilentLogger
from aiinfra.observe.power import PowerMeter
from aiinfra.train import Trainer


def test_without_a_gpu_the_meter_is_off_and_says_why() -> None:
    meter = PowerMeter(torch.device("cpu"))
    assert not meter.available and "the device is cpu" in meter.reason
    assert meter.read() == -1.0 and meter.power_watts() == -1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: NVML energy is tested on a GPU")
def test_energy_per_step_and_token_on_cuda(tiny_config: Config, tmp_path) -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install aiinfra[nvml])")
    config = tiny_config.model_copy(deep=True)
    config.train.device = "cuda"
    trainer = Trainer(config, run_dir=tmp_path / "run")
    records = [trainer.run_step(SilentLogger()) for _ in range(5)]
    assert all(r["energy_j"] > 0 and r["power_w"] > 0 for r in records[1:])
    assert records[-1]["energy_j_per_token"] == pytest.approx(records[-1]["energy_j"] / trainer.tokens_per_step)
