"""Per-rank measurements: communication and compute time from the profiler, peak memory, stragglers.

Communication time is measured, not estimated: on a profiled step, the time the process group's own worker
threads spent inside collectives (gloo:* / nccl:* events, overlapping spans merged). Compute time is the summed
duration of the leaf operators (matmuls, adds, ...) that ran outside collectives. Profiling costs time, so only
one step in `parallel.measure_comm_every` is profiled.
"""

from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import dataclass

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

# Event names of the collectives themselves (the CPU-side launch and the backend's worker-thread span).
_COMM_MARKERS = ("gloo:", "nccl:", "ncclkernel", "ncclDevKernel", "c10d::", "record_param_comms")


def is_comm_event(name: str) -> bool:
    """Whether a profiler event is a collective (or its launch)."""
    lowered = name.lower()
    return any(marker.lower() in lowered for marker in _COMM_MARKERS)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) spans in microseconds, in seconds."""
    total, current_end = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= current_end:
            continue
        total += end - max(start, current_end)
        current_end = end
    return total / 1e6


@dataclass(frozen=True)
class CommCompute:
    """Seconds one profiled step spent communicating (merged spans) and computing (leaf operators)."""

    comm_s: float
    compute_s: float


def split_comm_compute(events: list[FunctionEvent]) -> CommCompute:
    """Communication vs computation time of the events of one profiled step."""
    comm_spans = [(e.time_range.start, e.time_range.end) for e in events if is_comm_event(e.name)]
    comm_children = {id(child) for e in events if is_comm_event(e.name) for child in e.cpu_children}
    compute_s = sum(
        e.time_range.elapsed_us()
        for e in events
        if not e.cpu_children and not is_comm_event(e.name) and id(e) not in comm_children
    )
    return CommCompute(comm_s=union_seconds(comm_spans), compute_s=compute_s / 1e6)


class StepProfiler:
    """Profiles one step: `with StepProfiler() as p: ...; p.result` is its CommCompute."""

    def __init__(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities)
        self.result = CommCompute(0.0, 0.0)

    def __enter__(self) -> StepProfiler:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self.result = split_comm_compute(list(self._profile.events()))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated device memory on CUDA, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def stragglers(times_s: list[float], ratio: float) -> list[int]:
    """Ranks whose time exceeds `ratio` x the median of all ranks."""
    median = statistics.median(times_s)
    return [rank for rank, value in enumerate(times_s) if median > 0 and value > ratio * median]
