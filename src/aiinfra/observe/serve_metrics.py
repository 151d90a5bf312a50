"""Prometheus metrics of the server, in base units (seconds, tokens, ratios), on a registry of its own.

The metrics themselves are defined in `observe.catalogue`. Values come from the engine's outputs and its per-step
stats, observed on the event loop, never inside the step.
"""

from __future__ import annotations

from prometheus_client import generate_latest

from aiinfra.observe.catalogue import MetricSet


class ServeMetrics(MetricSet):
    """Every metric `/metrics` exposes (catalogue section "serve"); one instance per server (tests run several in
    one process)."""

    def __init__(self) -> None:
        super().__init__("serve")
        self._preemptions_seen = 0

    def observe_engine(self, num_running: int, num_waiting: int, kv_cache_usage: float, num_preemptions: int) -> None:
        """Copy the engine's per-step state into the gauges and counters."""
        self.requests_running.set(num_running)
        self.requests_waiting.set(num_waiting)
        self.kv_cache_usage_ratio.set(kv_cache_usage)
        if num_preemptions > self._preemptions_seen:
            self.preemptions.inc(num_preemptions - self._preemptions_seen)
            self._preemptions_seen = num_preemptions

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
