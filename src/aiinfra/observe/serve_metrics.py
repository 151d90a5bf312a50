"""Prometheus metrics of the server, in base units (seconds, tokens, ratios), on a registry of its own.

Values come from the engine's outputs and its per-step stats, observed on the event loop, never inside the step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Every metric `/metrics` exposes; one instance per server (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        prefix = "aiinfra_serve"
        self.requests_running = Gauge(f"{prefix}_requests_running", "Requests in the running batch", registry=registry)
        self.requests_waiting = Gauge(f"{prefix}_requests_waiting", "Requests queued for the batch", registry=registry)
        self.kv_cache_usage_ratio = Gauge(
            f"{prefix}_kv_cache_usage_ratio", "Share of KV cache blocks held by requests (0..1)", registry=registry
        )
        self.time_to_first_token_seconds = Histogram(
            f"{prefix}_time_to_first_token_seconds", "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.inter_token_latency_seconds = Histogram(
            f"{prefix}_inter_token_latency_seconds", "Between successive generated tokens of a request",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.e2e_request_latency_seconds = Histogram(
            f"{prefix}_e2e_request_latency_seconds", "From arrival to the last token", buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "Generated tokens", registry=registry)
        self.prefix_cache_hit_tokens = Counter(
            f"{prefix}_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", registry=registry
        )
        self.preemptions = Counter(
            f"{prefix}_preemptions", "Requests preempted for lack of KV blocks", registry=registry
        )
        self.requests_finished = Counter(
            f"{prefix}_requests_finished", "Finished requests by reason", ["finish_reason"], registry=registry
        )
        self.requests_rejected = Counter(
            f"{prefix}_requests_rejected", "Requests refused before running, by reason", ["reason"], registry=registry
        )
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
