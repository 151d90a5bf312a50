"""Goodput across restarts: productive training time over wall time since the job first started."""

from __future__ import annotations

import time
from typing import Any


def effective_training_time_ratio(productive_s: float, wall_s: float) -> float:
    """Productive step time over wall time (Llama 3 reports > 0.9): 1.0 means no time lost to checkpoints,
    restarts, recomputed steps or start-up."""
    if wall_s <= 0:
        raise ValueError(f"wall_s={wall_s}: must be > 0")
    return productive_s / wall_s


class Goodput:
    """Tracks productive training time across restarts; save it in the checkpoint (`TrainingState.extra`).

    Steps lost to a crash are not in the checkpoint, so after a resume they no longer count as productive, while
    the wall clock keeps running from the job's first start: the ratio falls exactly by the work that was lost.
    """

    def __init__(self) -> None:
        self.first_start_unix_s = time.time()
        self.productive_s = 0.0

    def add_step(self, step_time_s: float) -> None:
        """Count one finished training step."""
        self.productive_s += step_time_s

    def ratio(self) -> float:
        """The effective training time ratio since the job first started."""
        return effective_training_time_ratio(self.productive_s, max(time.time() - self.first_start_unix_s, 1e-9))

    def state_dict(self) -> dict[str, Any]:
        return {"first_start_unix_s": self.first_start_unix_s, "productive_s": self.productive_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_start_unix_s = float(state["first_start_unix_s"])
        self.productive_s = float(state["productive_s"])
