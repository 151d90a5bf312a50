"""Straggler detection: a score per rank every step, and a rank named only when it stays slow.

Every rank measures its compute time of a step (work done, waits excluded: on CPU the training thread's CPU time,
which a rank blocked in a collective or descheduled on a loaded machine does not accrue), and the trainer gathers
one float per rank per step in the all-gather it already does for the per-rank figures. A rank's score is the
fastest rank's compute time over its own (1: fastest; NVIDIA's resiliency extension scores ranks 0..1 the same way
and flags below 0.7). One slow step is noise (a page fault, a garbage collection); a rank is named the straggler
when it scores below the threshold for `steps` steps in a row and, over those steps, at least `min_seconds` of its own
compute, and stops being named after `steps` good steps. The time floor matters only where steps are short: an
operating-system transient (a garbage-collection pause, page-cache writeback, a neighbour's burst on a shared host)
lasts up to a few hundred milliseconds, which is one step of real training but several of a small CPU run; a rank
that is really slow stays slow for longer than that.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def straggler_scores(compute_s: list[float]) -> list[float]:
    """Fastest compute time over each rank's (1.0 for the fastest; 1.0 for every rank when none took time)."""
    fastest = min(compute_s)
    return [fastest / value if value > 0 else 1.0 for value in compute_s]


def slowest_over_median(compute_s: list[float]) -> float:
    """The slowest rank's compute time over the median rank's."""
    median = statistics.median(compute_s)
    return max(compute_s) / median if median > 0 else 1.0


@dataclass
class StragglerDetector:
    """Names the rank that scored below `threshold` for `steps` consecutive steps spanning at least `min_seconds` of
    its compute (None while no rank does)."""

    threshold: float = 0.7
    steps: int = 3
    min_seconds: float = 0.5
    _slow: dict[int, tuple[int, float]] = field(default_factory=dict)  # rank -> (slow steps in a row, their compute)
    _good_streak: int = 0
    straggler: int | None = None

    def update(self, compute_s: list[float]) -> dict[str, object]:
        """Feed one step's per-rank compute times; return the step's straggler fields for the record."""
        scores = straggler_scores(compute_s)
        slow = {rank for rank, score in enumerate(scores) if score < self.threshold}
        previous, self._slow = self._slow, {}
        for rank in slow:  # a rank's streak ends at its first good step
            streak, seconds = previous.get(rank, (0, 0.0))
            self._slow[rank] = (streak + 1, seconds + compute_s[rank])
        persistent = [rank for rank, (streak, seconds) in self._slow.items()
                      if streak >= self.steps and seconds >= self.min_seconds]
        newly_named = None
        if persistent:
            worst = min(persistent, key=lambda rank: scores[rank])
            if worst != self.straggler:
                newly_named = worst
            self.straggler, self._good_streak = worst, 0
        elif self.straggler is not None:
            self._good_streak += 1
            if self._good_streak >= self.steps:
                self.straggler, self._good_streak = None, 0
        return {
            "rank_straggler_score": scores,
            "straggler_compute_ratio": slowest_over_median(compute_s),
            "straggler_rank": self.straggler,
            "straggler_named": newly_named,
        }
