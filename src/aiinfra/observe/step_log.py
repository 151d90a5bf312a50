"""The step logger: one JSON line per step in metrics.jsonl, and a live rich progress bar (or plain lines).

It is the only place the trainer reports to, so the per-step cost is one dict, one write and one bar update.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl`; shows step, loss, tokens/s and MFU as it goes."""

    def __init__(self, run_dir: Path, total_steps: int, progress: bool = True, log_every: int = 10):
        self.path = run_dir / "metrics.jsonl"
        self._file: TextIO = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        self.console = Console(stderr=True)
        self.log_every = log_every
        self.total_steps = total_steps
        self._progress: Progress | None = None
        if progress and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def print(self, message: str) -> None:
        """A line above the bar (or on stderr when there is none)."""
        self.console.print(message, highlight=False)

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's metrics and update the display."""
        self._file.write(json.dumps(record) + "\n")
        if "loss" not in record:
            return
        status = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=status)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total_steps:
            print(f"step {record['step']}/{self.total_steps}  {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._file.close()


class RankLogger:
    """Every rank's own JSONL (`<run_dir>/ranks/rank<N>.jsonl`): its step time, compute time, memory and score."""

    def __init__(self, run_dir: Path, rank: int):
        self.name = f"ranks/rank{rank}.jsonl"
        (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(run_dir / self.name, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        """One line of this rank's figures of a step."""
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int, name: str = "metrics.jsonl") -> int:
    """Drop the records of steps after `last_step` from a run's metrics.jsonl (or another of its JSONL files: `name`)
    (trained before a crash, lost with it), atomically, so the file reads as one uninterrupted run; return how many
    records remain."""
    path = run_dir / name
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed writer
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as handle:
            handle.write("".join(line + "\n" for line in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    return len(kept)
