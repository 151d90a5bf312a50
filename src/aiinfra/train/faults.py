"""Fault injection for tests and demos: the `fault` config section as a schedule of SIGKILLs.

`fault.kill_step`/`fault.kill_rank` kill one rank at one step on the job's first attempt; `fault.random_kills`
kills a random rank at a random step on each of the job's first N attempts (torchrun's restart count numbers
them). `fault.slow_rank`/`fault.slow_ms`/`fault.slow_from_step` make one rank compute longer every step from a
step on (a straggler, for the detector in `observe.straggler`). Torn checkpoint writes are the checkpoint layer's
own fault injection (`AIINFRA_CHECKPOINT_FAULT`).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable

from aiinfra.config import ConfigError, FaultConfig


def check_fault_rank(fault: FaultConfig, world_size: int) -> None:
    """A ConfigError unless fault.kill_rank names a rank of this world (checked before training starts)."""
    if fault.kill_step and fault.kill_rank >= world_size:
        raise ConfigError(f"fault.kill_rank={fault.kill_rank}: expected a rank below the world size {world_size}")
    if fault.slow_ms and fault.slow_rank >= world_size:
        raise ConfigError(f"fault.slow_rank={fault.slow_rank}: expected a rank below the world size {world_size}")


def busy_cpu(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time computing: a slower device, not a sleep (a sleeping rank is idle,
    a slow one is busy, and the straggler detector measures busy time)."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        sum(range(1000))


def maybe_slow(fault: FaultConfig, step: int, rank: int) -> None:
    """Compute fault.slow_ms longer if `rank` is fault.slow_rank and `step` is at or past fault.slow_from_step."""
    if fault.slow_ms and rank == fault.slow_rank and step >= fault.slow_from_step:
        busy_cpu(fault.slow_ms / 1000)


class FaultSchedule:
    """The (step, rank) pairs at which this attempt of the job SIGKILLs a rank; every rank draws the same pairs
    (same seed, same attempt number, same resumed step)."""

    def __init__(self, fault: FaultConfig, world_size: int, first_step: int, total_steps: int):
        check_fault_rank(fault, world_size)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.kills = [(fault.kill_step, fault.kill_rank)] if fault.kill_step and attempt == 0 else []
        if attempt < fault.random_kills and first_step < total_steps:
            draw = random.Random(f"{fault.random_seed}:{attempt}")
            self.kills.append((draw.randint(first_step + 1, total_steps), draw.randrange(world_size)))

    def maybe_kill(self, step: int, rank: int, before_kill: Callable[[], None]) -> None:
        """SIGKILL this process if the schedule names this step and rank, after `before_kill` (e.g. let a save in
        flight commit, so the kill lands between two complete checkpoints and a test knows which one resumes)."""
        if (step, rank) in self.kills:
            before_kill()
            print(f"fault injection: SIGKILL rank {rank} at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
