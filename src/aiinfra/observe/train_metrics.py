"""Rank 0's Prometheus /metrics while training: the catalogue's "train" section, set from each step's record.

The exporter is prometheus-client's own HTTP server on a thread of its own, so a scrape never waits for a step
and a step never waits for a scrape; per step the trainer only sets a few gauges. With `observe.metrics_port=0`
the OS picks a free port and `<run.dir>/observe.json` says which (the dashboard and tests read it there).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest, start_http_server

from aiinfra.observe.catalogue import MetricSet

OBSERVE_FILE = "observe.json"


class TrainMetrics(MetricSet):
    """Every training metric (catalogue section "train"), optionally served over HTTP."""

    def __init__(self) -> None:
        super().__init__("train")
        self._server = self._thread = None
        self._checkpoints_seen = 0
        self._last_checkpoint_unix_s: float | None = None
        self.checkpoint_age_seconds.set_function(self._checkpoint_age_s)
        self.straggler_rank.set(-1)

    def _checkpoint_age_s(self) -> float:
        return time.time() - self._last_checkpoint_unix_s if self._last_checkpoint_unix_s is not None else -1.0

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on `host:port` (0: a free port); return the port it listens on."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def start(self, restarts: int, predicted_step_time_s: float | None) -> None:
        """The figures known before the first step."""
        self.restarts.set(restarts)
        if predicted_step_time_s is not None:
            self.predicted_step_time_seconds.set(predicted_step_time_s)

    def observe_step(self, record: dict[str, Any], tokens_per_step: int) -> None:
        """Set the gauges from one step's record (the same record metrics.jsonl gets)."""
        self.step.set(record["step"])
        self.loss.set(record["loss"])
        self.tokens_per_second.set(record["tokens_per_s"])
        self.mfu_ratio.set(record["mfu"])
        self.tokens.inc(tokens_per_step)
        self.step_time_seconds.observe(record["step_time_s"])
        self.restarts.set(record["restarts"])
        self.effective_training_time_ratio.set(record["effective_training_time_ratio"])
        if "val_loss" in record:
            self.validation_loss.set(record["val_loss"])
        for rank, value in enumerate(record.get("rank_step_time_s", [record["step_time_s"]])):
            self.rank_step_time_seconds.labels(str(rank)).set(value)
        for rank, value in enumerate(record.get("rank_compute_s_step", [])):
            self.rank_compute_seconds.labels(str(rank)).set(value)
        for rank, value in enumerate(record.get("rank_straggler_score", [])):
            self.rank_straggler_score.labels(str(rank)).set(value)
        for rank, value in enumerate(record.get("rank_peak_memory_bytes", [record.get("peak_memory_bytes", 0)])):
            self.peak_memory_bytes.labels(str(rank)).set(value)
        if "straggler_compute_ratio" in record:
            self.straggler_compute_ratio.set(record["straggler_compute_ratio"])
            straggler = record["straggler_rank"]
            self.straggler_rank.set(-1 if straggler is None else straggler)
            if record["straggler_named"] is not None:
                self.straggler_detections.labels(str(record["straggler_named"])).inc()
        if "comm_fraction" in record:
            self.communication_ratio.set(record["comm_fraction"])
        if record["checkpoint_saves"] > self._checkpoints_seen:
            self.checkpoints.inc(record["checkpoint_saves"] - self._checkpoints_seen)
            self._checkpoints_seen = record["checkpoint_saves"]
            self._last_checkpoint_unix_s = time.time()
            self.checkpoint_save_seconds.set(record["checkpoint_save_s"])
            self.checkpoint_blocking_seconds.set(record["checkpoint_blocking_s"])
        if record.get("energy_j", -1.0) >= 0:
            self.energy_joules.inc(record["energy_j"])
            self.energy_per_token_joules.set(record["energy_j_per_token"])
            self.power_watts.set(record["power_w"])

    def render(self) -> bytes:
        """The text exposition format (what /metrics answers)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop serving /metrics."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None


def write_observe_file(run_dir: Path, info: dict[str, Any]) -> None:
    """`<run_dir>/observe.json` (atomically): where /metrics listens and what the dashboard draws beside it."""
    path = run_dir / OBSERVE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def read_observe_file(run_dir: Path) -> dict[str, Any]:
    """What `write_observe_file` wrote ({} when the run has none)."""
    try:
        return json.loads((run_dir / OBSERVE_FILE).read_text())
    except (OSError, ValueError):
        return {}
