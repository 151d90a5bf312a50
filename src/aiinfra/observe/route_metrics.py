"""Prometheus metrics of the gateway (`aiinfra route`), in base units, on a registry of its own.

Per-backend series carry a `backend` label (the FLEET.toml name); nothing here holds a key or a prompt.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from aiinfra.observe.serve_metrics import LATENCY_BUCKETS_S


class RouteMetrics:
    """Every metric the gateway's `/metrics` exposes; one instance per gateway process."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        prefix = "aiinfra_route"
        self.backend_up = Gauge(f"{prefix}_backend_up", "1 while the backend passes health checks and is not "
                                "ejected", ["backend"], registry=registry)
        self.backend_outstanding = Gauge(
            f"{prefix}_backend_outstanding_requests", "Requests dispatched to the backend and not yet finished",
            ["backend"], registry=registry)
        self.backend_requests = Counter(
            f"{prefix}_backend_requests", "Attempts sent to a backend, by HTTP status (or 'error': no response, "
            "'cut': the stream broke)", ["backend", "status"], registry=registry)
        self.time_to_first_token_seconds = Histogram(
            f"{prefix}_time_to_first_token_seconds", "From dispatch to the backend's first streamed token",
            ["backend"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.request_latency_seconds = Histogram(
            f"{prefix}_request_latency_seconds", "From dispatch to the end of the backend's answer", ["backend"],
            buckets=LATENCY_BUCKETS_S, registry=registry)
        self.client_requests = Counter(
            f"{prefix}_client_requests", "Client requests answered, by model and HTTP status", ["model", "status"],
            registry=registry)
        self.retries = Counter(
            f"{prefix}_retries", "Attempts sent to another backend after one failed before its first byte",
            ["backend"], registry=registry)
        self.failovers = Counter(
            f"{prefix}_failovers", "Requests moved to another backend, before the stream started or during it",
            ["phase"], registry=registry)
        self.hedges = Counter(f"{prefix}_hedges", "Second copies sent after the hedging delay", ["backend"],
                              registry=registry)
        self.hedge_wins = Counter(f"{prefix}_hedge_wins", "Hedged copies that answered first", registry=registry)
        self.ejections = Counter(f"{prefix}_ejections", "Outlier ejections", ["backend"], registry=registry)
        self.stream_errors = Counter(
            f"{prefix}_stream_errors", "Streams ended with an error event because no backend could continue them",
            registry=registry)

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
