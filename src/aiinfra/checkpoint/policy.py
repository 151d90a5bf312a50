"""When checkpoints are saved (`CheckpointPolicy`) and what saving them cost (`CheckpointMetrics`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointPolicy:
    """When to save and what to keep."""

    every_steps: int = 0
    """save when step % every_steps == 0 (0: never by step count)"""
    every_seconds: float = 0.0
    """save when this long has passed since the last save (0: never by time); rank 0's clock decides for all"""
    keep_last: int = 3
    """complete checkpoints kept on disk (older ones are deleted once a newer one commits); 0 keeps all"""
    async_save: bool = True
    """write in a background thread: only the copy of the state to CPU memory blocks training"""
    writer_threads: int = 2
    """files written in parallel per rank (one thread's hashing and serialization overlap another's disk writes)"""
    overlap_staging: bool = False
    """an async save's copy of the state runs in the background while training computes; whoever changes the
    state next calls `CheckpointManager.before_update()` first (the trainer does, before each optimizer step)"""


@dataclass
class CheckpointMetrics:
    """What checkpointing cost so far, for the trainer's metrics line."""

    saves: int = 0
    last_step: int | None = None
    last_blocking_s: float = 0.0
    last_save_s: float = 0.0
    last_bytes: int = 0
    total_blocking_s: float = 0.0
    total_save_s: float = 0.0
    total_bytes: int = 0
    load_s: float = 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        """Flat metric names for metrics.jsonl."""
        return {
            "checkpoint_saves": self.saves,
            "checkpoint_last_step": self.last_step,
            "checkpoint_blocking_s": self.last_blocking_s,
            "checkpoint_save_s": self.last_save_s,
            "checkpoint_bytes": self.last_bytes,
            "checkpoint_blocking_s_total": self.total_blocking_s,
            "checkpoint_save_s_total": self.total_save_s,
            "checkpoint_bytes_total": self.total_bytes,
            "checkpoint_load_s": self.load_s,
        }
