"""Prometheus metrics of the gateway (`aiinfra route`), in base units, on a registry of its own.

The metrics themselves are defined in `observe.catalogue`. Per-backend series carry a `backend` label (the
FLEET.toml name); nothing here holds a key or a prompt.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, generate_latest

from aiinfra.observe.catalogue import MetricSet


class RouteMetrics(MetricSet):
    """Every metric the gateway's `/metrics` exposes (catalogue section "route"); one instance per gateway process."""

    def __init__(self) -> None:
        super().__init__("route")
        self._children: dict[tuple, object] = {}

    def child(self, metric: Counter | Histogram, *labels: str):  # noqa: ANN201 - prometheus' own child types
        """`metric.labels(*labels)`, memoised: the per-request paths skip prometheus' label lookup and lock."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
