"""Straggler detection end to end: 2 gloo ranks under the launcher (`aiinfra train --nproc 2`), one slowed through
the fault options (it computes `fault.slow_ms` longer every step), is named within 5 steps in the log, in
metrics.jsonl and in every rank's own JSONL; a clean 30-step run names no rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiinfra.distributed.launch import launch_train
from aiinfra.observe.straggler import StragglerDetector

SLOW_FROM_STEP = 4


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_two_ranks(base: list[str], run_dir: Path, steps: int, extra: list[str]) -> None:
    overrides = [
        *base,
        f"train.steps={steps}",
        "checkpoint.every_steps=0",
        "parallel.measure_comm_every=0",
        "observe.metrics_port=-1",
        f"run.dir={run_dir}",
        *extra,
    ]
    assert launch_train(None, overrides, nproc=2) == 0


def test_straggler_slowed_rank_is_named_within_5_steps(base: list[str], tmp_path: Path, capfd) -> None:
    run_dir = tmp_path / "slow"
    train_two_ranks(
        base, run_dir, 10, ["fault.slow_rank=1", "fault.slow_ms=150", f"fault.slow_from_step={SLOW_FROM_STEP}"]
    )
    main = records(run_dir / "metrics.jsonl")
    named_at = next(r["step"] for r in main if r["straggler_rank"] == 1)
    assert SLOW_FROM_STEP <= named_at < SLOW_FROM_STEP + 5
    assert all(r["straggler_rank"] is None for r in main if r["step"] < SLOW_FROM_STEP)
    assert all(r["straggler_rank"] == 1 for r in main if r["step"] >= named_at)
    assert all(r["rank_straggler_score"][1] < 0.7 for r in main if r["step"] >= SLOW_FROM_STEP)
    for rank in (0, 1):  # every rank's own JSONL says it too
        own = records(run_dir / "ranks" / f"rank{rank}.jsonl")
        assert [r["straggler_rank"] for r in own] == [r["straggler_rank"] for r in main]
    assert f"straggler: rank 1 at step {named_at}" in capfd.readouterr().err


def test_straggler_clean_30_step_run_names_no_rank(base: list[str], tmp_path: Path, capfd) -> None:
    run_dir = tmp_path / "clean"
    train_two_ranks(base, run_dir, 30, [])
    main = records(run_dir / "metrics.jsonl")
    assert len(main) == 30
    assert [r["step"] for r in main if r["straggler_rank"] is not None] == []
    assert all(len(r["rank_compute_s_step"]) == 2 and min(r["rank_compute_s_step"]) > 0 for r in main)
    assert "straggler:" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("times", "named"),
    [
        ([[1.0, 1.0]] * 5, [None] * 5),
        ([[1.0, 1.0], [1.0, 3.0], [1.0, 1.0], [1.0, 3.0], [1.0, 3.0]], [None] * 5),  # never 3 slow steps in a row
        ([[1.0, 3.0]] * 4, [None, None, 1, 1]),
        ([[1.0, 3.0]] * 3 + [[1.0, 1.0]] * 3, [None, None, 1, 1, 1, None]),  # cleared after 3 good steps
    ],
)
def test_straggler_detector_needs_persistence(times: list[list[float]], named: list[int | None]) -> None:
    detector = StragglerDetector(threshold=0.7, steps=3)
    assert [detector.update(step)["straggler_rank"] for step in times] == named


def test_straggler_transient_shorter_than_the_time_floor_is_not_named() -> None:
    """A rank twice as slow for 4 steps of 20 ms (a host transient of 160 ms on a small CPU run) is not named; the
    same ratio over steps that add up to the floor is."""
    detector = StragglerDetector(threshold=0.7, steps=3, min_seconds=0.5)
    transient = [[0.02, 0.02]] * 3 + [[0.02, 0.04]] * 4 + [[0.02, 0.02]] * 3
    assert [detector.update(step)["straggler_rank"] for step in transient] == [None] * 10
    detector = StragglerDetector(threshold=0.7, steps=3, min_seconds=0.5)
    lasting = [[0.1, 0.2]] * 4
    assert [detector.update(step)["straggler_rank"] for step in lasting] == [None, None, 1, 1]
    detector = StragglerDetector(threshold=0.7, steps=3, min_seconds=0.0)  # the floor off: steps alone decide
    assert [detector.update(step)["straggler_rank"] for step in transient][6] == 1
