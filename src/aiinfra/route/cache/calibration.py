"""The one knob: a target false-hit rate, turned into a cosine threshold by the calibration half of the evaluation
set (`bench/cache_eval.py --write`), among pairs that the guard lets through.

The threshold is the lowest at which the share of different-question pairs still hitting, counted as
(hits + 1) / (negatives + 1) so that a handful of pairs cannot promise a rate they cannot measure, stays within the
target."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
FLOOR = 0.5  # never below this, whatever the calibration says: a guard is not a substitute for similarity


@cache
def _load() -> tuple[int, tuple[float, ...]]:
    data = json.loads(CALIBRATION_PATH.read_text())
    return int(data["negatives"]), tuple(sorted(data["passing_negative_cosines"], reverse=True))


def threshold_for(target_false_hit_rate: float) -> float:
    """The cosine threshold that meets the target on the calibration pairs."""
    negatives, scores = _load()
    allowed = 0
    while allowed < len(scores) and (allowed + 2) / (negatives + 1) <= target_false_hit_rate:
        allowed += 1
    if allowed >= len(scores):
        return FLOOR
    return max(FLOOR, scores[allowed] + 1e-4)
