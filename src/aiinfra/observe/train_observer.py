"""What the trainer reports to while it runs, besides the step logger: rank 0's /metrics, the straggler detector,
every rank's own JSONL, NVML energy and optional TensorBoard event files.

The trainer calls `start` once, `enrich` and `publish` with each step's record, and `close`; everything here is
plain data in, so observe/ stays below the pillars.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from aiinfra.config import Config, ConfigError
from aiinfra.observe.power import PowerMeter
from aiinfra.observe.prediction import predicted_step_time
from aiinfra.observe.step_log import RankLogger, truncate_metrics
from aiinfra.observe.straggler import StragglerDetector
from aiinfra.observe.train_metrics import TrainMetrics, write_observe_file


class TensorBoardWriter:
    """Scalars of each step as TensorBoard event files under `<run_dir>/tensorboard` (needs `tensorboard`)."""

    SCALARS = ("loss", "val_loss", "tokens_per_s", "mfu", "step_time_s", "effective_training_time_ratio")

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("observe.tensorboard=true: the tensorboard package is not installed") from None
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for name in self.SCALARS:
            if name in record:
                self._writer.add_scalar(f"train/{name}", record[name], record["step"])

    def close(self) -> None:
        self._writer.close()


class TrainObserver:
    """One per rank; rank 0 also serves /metrics and writes observe.json."""

    def __init__(self, config: Config, run_dir: Path, rank: int, world_size: int, device: torch.device,
                 tokens_per_step: int):
        self.config, self.run_dir, self.rank, self.world_size, self.device = config, run_dir, rank, world_size, device
        self.tokens_per_step = tokens_per_step
        self.is_main = rank == 0
        observe = config.observe
        self.detector = StragglerDetector(observe.straggler_threshold, observe.straggler_steps, observe.straggler_min_s)
        self.power = PowerMeter(device)
        self.metrics: TrainMetrics | None = None
        self.rank_log: RankLogger | None = None
        self.tensorboard: TensorBoardWriter | None = None
        # CPU time of the training thread is work done (waits in collectives and time descheduled excluded); CUDA
        # work is asynchronous, so there the wall time of the step is what can be had for free.
        self.busy_clock = time.thread_time if device.type == "cpu" else time.perf_counter

    def start(self, step: int, restarts: int, peak_flops_per_s: float) -> str:
        """Open the outputs (after a resume to `step`); return a line for the log saying where /metrics is."""
        if self.world_size > 1:
            self.rank_log = RankLogger(self.run_dir, self.rank)
            truncate_metrics(self.run_dir, step, self.rank_log.name)
        if not self.is_main:
            return ""
        observe = self.config.observe
        if observe.tensorboard:
            self.tensorboard = TensorBoardWriter(self.run_dir)
        predicted_s, source = predicted_step_time(self.config, self.device, peak_flops_per_s)
        url = None
        if observe.metrics_port >= 0:
            self.metrics = TrainMetrics()
            port = self.metrics.serve(observe.metrics_host, observe.metrics_port)
            url = f"http://{observe.metrics_host}:{port}/metrics"
            self.metrics.start(restarts, predicted_s)
        write_observe_file(self.run_dir, {
            "metrics_url": url, "world_size": self.world_size, "device": str(self.device),
            "predicted_step_time_s": predicted_s, "prediction_source": source,
            "energy": "nvml" if self.power.available else self.power.reason,
            "straggler_threshold": observe.straggler_threshold, "straggler_steps": observe.straggler_steps,
            "straggler_min_s": observe.straggler_min_s,
        })
        prediction = f"predicted step time {predicted_s:.3f} s" if predicted_s is not None else source
        where = f"metrics at {url}" if url else "metrics off (observe.metrics_port=-1)"
        return f"{where}; {prediction}; {'energy from NVML' if self.power.available else self.power.reason}"

    def enrich(self, record: dict[str, Any]) -> str | None:
        """Add the straggler and energy fields to a step's record; return a line to log when a straggler is named."""
        if record["energy_j"] >= 0:
            record["energy_j_per_token"] = record["energy_j"] / self.tokens_per_step
            record["power_w"] = self.power.power_watts()
        if self.world_size == 1:
            return None
        record |= self.detector.update(record["rank_compute_s_step"])
        named = record["straggler_named"]
        if named is None:
            return None
        times = record["rank_compute_s_step"]
        return (f"straggler: rank {named} at step {record['step']} (compute {times[named] * 1000:.0f} ms, fastest "
                f"{min(times) * 1000:.0f} ms, score {record['rank_straggler_score'][named]:.2f})")

    def publish(self, record: dict[str, Any]) -> None:
        """Hand the finished record to every output of this rank."""
        if self.rank_log is not None:
            self.rank_log.log({
                "step": record["step"], "step_time_s": record["rank_step_time_s"][self.rank],
                "compute_s": record["rank_compute_s_step"][self.rank],
                "peak_memory_bytes": record["rank_peak_memory_bytes"][self.rank],
                "straggler_score": record["rank_straggler_score"][self.rank],
                "straggler_rank": record["straggler_rank"],
            })
        if self.metrics is not None:
            self.metrics.observe_step(record, self.tokens_per_step)
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def close(self) -> None:
        for output in (self.metrics, self.rank_log, self.tensorboard):
            if output is not None:
                output.close()
        self.metrics = self.rank_log = self.tensorboard = None
