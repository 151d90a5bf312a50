"""Prometheus metrics of the gateway (`aiinfra route`), in base units, on a registry of its own.

Per-backend series carry a `backend` label (the FLEET.toml name); nothing here holds a key or a prompt.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from aiinfra.observe.serve_metrics import LATENCY_BUCKETS_S

CACHE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)


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

        self.cache_lookups = Counter(f"{prefix}_cache_lookups", "Requests the semantic cache looked up",
                                     registry=registry)
        self.cache_hits = Counter(f"{prefix}_cache_hits", "Lookups answered from the cache", ["match"],
                                  registry=registry)
        self.cache_misses = Counter(f"{prefix}_cache_misses", "Lookups that went to a backend", registry=registry)
        self.cache_bypasses = Counter(
            f"{prefix}_cache_bypasses", "Requests not looked up (temperature, Cache-Control, unsupported)",
            ["reason"], registry=registry)
        self.cache_guard_rejections = Counter(
            f"{prefix}_cache_guard_rejections", "Near entries the guard turned down as a different question",
            registry=registry)
        self.cache_stores = Counter(f"{prefix}_cache_stores", "Answers stored", registry=registry)
        self.cache_evictions = Counter(f"{prefix}_cache_evictions", "Entries dropped by bytes or TTL",
                                       registry=registry)
        self.cache_tokens_saved = Counter(f"{prefix}_cache_tokens_saved",
                                          "Backend tokens (prompt + completion) that hits did not spend",
                                          registry=registry)
        self.cache_entries = Gauge(f"{prefix}_cache_entries", "Entries held by this process", registry=registry)
        self.cache_bytes = Gauge(f"{prefix}_cache_bytes", "Bytes of the entries held by this process",
                                 registry=registry)
        self.cache_lookup_seconds = Histogram(
            f"{prefix}_cache_lookup_seconds", "From the start of a lookup to its hit or miss (embedding included)",
            buckets=CACHE_BUCKETS_S, registry=registry)

        self.cascade_decisions = Counter(
            f"{prefix}_cascade_decisions", "Requests to a cascade's virtual model, by the pool that answered (small, "
            "large) and why", ["model", "pool", "reason"], registry=registry)
        self.cascade_score = Histogram(
            f"{prefix}_cascade_score", "Confidence scores the cascade judged (a probability)", ["model"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), registry=registry)

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
