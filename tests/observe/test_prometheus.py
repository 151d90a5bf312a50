"""A real Prometheus (Debian's package) scrapes a short training run and a server; the metrics come back through
its HTTP query API."""

from __future__ import annotations

import pytest

from .conftest import STEPS, Stack, missing


def test_prometheus_scrapes_training_and_serving(stack: Stack) -> None:
    if stack.prometheus is None:
        pytest.skip(missing("prometheus"))
    prometheus = stack.prometheus
    # Training ran while Prometheus scraped its rank 0 every second: the last step it saw is a real step.
    steps = prometheus.query(f'max_over_time(aiinfra_train_step{{instance="127.0.0.1:{stack.train_port}"}}[10m])')
    assert steps and 1 <= float(steps[0]["value"][1]) <= STEPS, steps
    losses = prometheus.query("max_over_time(aiinfra_train_loss[10m])")
    assert losses and float(losses[0]["value"][1]) > 0
    ranks = prometheus.query("max_over_time(aiinfra_train_rank_compute_seconds[10m])")
    assert sorted(r["metric"]["rank"] for r in ranks) == ["0", "1"]
    # The server's counters after the load test: every generated token counted.
    generated = prometheus.query("aiinfra_serve_generation_tokens_total")
    assert generated and float(generated[0]["value"][1]) == stack.load_report["total_output_tokens"]
    ttft = prometheus.query("histogram_quantile(0.5, sum by (le) (aiinfra_serve_time_to_first_token_seconds_bucket))")
    assert ttft and float(ttft[0]["value"][1]) > 0
