"""The one catalogue of every metric aiinfra exposes: training, serving and the gateway.

Each entry says its name, type, unit, labels and help; histograms carry buckets placed on the SLO boundaries the
dashboard draws. Names follow Prometheus' conventions: base units (seconds, bytes, a 0..1 ratio), the unit as the
suffix, counters named here without `_total` (prometheus-client appends it when exposing). `serve_metrics`,
`route_metrics` and `train_metrics` build their registries from these entries, the Markdown table in
docs/observability.md is generated from them (`python -m aiinfra.observe.catalogue --markdown`), and the
Grafana dashboard may query nothing that is not here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Kind = Literal["counter", "gauge", "histogram"]

# SLO lines the dashboard draws and the buckets are cut at (a histogram can only answer "what share met the SLO"
# exactly at one of its boundaries).
TTFT_SLO_S = 0.5
INTER_TOKEN_SLO_S = 0.1
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CACHE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)
STEP_TIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
assert TTFT_SLO_S in LATENCY_BUCKETS_S and INTER_TOKEN_SLO_S in LATENCY_BUCKETS_S


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Prometheus name (counters without `_total`), type, unit, help and labels."""

    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    attr: str = ""  # the attribute name on the pillar's metrics object (default: the name without its prefix)

    @property
    def exposed(self) -> str:
        """The name as scraped: counters gain `_total`; histograms expose `_bucket`, `_sum` and `_count` of it."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name a scrape holds for this metric."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.exposed,)


def _c(name: str, unit: str, help: str, labels: tuple[str, ...] = (), attr: str = "") -> MetricSpec:
    return MetricSpec(name, "counter", unit, help, labels, attr=attr)


def _g(name: str, unit: str, help: str, labels: tuple[str, ...] = (), attr: str = "") -> MetricSpec:
    return MetricSpec(name, "gauge", unit, help, labels, attr=attr)


def _h(name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "histogram", "seconds", help, labels, buckets)


TRAIN = (
    _g("aiinfra_train_step", "steps", "Optimizer steps finished"),
    _g("aiinfra_train_loss", "nats", "Training loss of the last step (cross-entropy per token, mean over ranks)"),
    _g("aiinfra_train_validation_loss", "nats", "Loss on the validation split at the last evaluation"),
    _g("aiinfra_train_tokens_per_second", "tokens/s", "Tokens trained per second in the last step (whole job)"),
    _g("aiinfra_train_mfu_ratio", "ratio", "Model FLOPs utilisation of the last step (0..1)"),
    _c("aiinfra_train_tokens", "tokens", "Tokens trained"),
    _h("aiinfra_train_step_time_seconds", "Wall time of one optimizer step", STEP_TIME_BUCKETS_S),
    _g("aiinfra_train_rank_step_time_seconds", "seconds", "Wall time of the last step, per rank", ("rank",)),
    _g("aiinfra_train_rank_compute_seconds", "seconds",
       "Compute time of the last step, per rank (CPU time of the training thread on CPU; waits excluded)",
       ("rank",)),
    _g("aiinfra_train_rank_straggler_score_ratio", "ratio",
       "Straggler score: the fastest rank's compute time over this rank's (1: fastest; below "
       "observe.straggler_threshold: slow)", ("rank",), attr="rank_straggler_score"),
    _g("aiinfra_train_straggler_compute_ratio", "ratio", "Slowest rank's compute time over the median rank's"),
    _g("aiinfra_train_straggler_rank", "rank",
       "The rank named straggler (slow for observe.straggler_steps steps in a row); -1 when none"),
    _c("aiinfra_train_straggler_detections", "events", "Times a rank was named straggler", ("rank",)),
    _g("aiinfra_train_communication_ratio", "ratio",
       "Share of the step spent in collectives, on the last profiled step (parallel.measure_comm_every)"),
    _g("aiinfra_train_peak_memory_bytes", "bytes", "Peak memory per rank (device memory on CUDA, RSS on CPU)",
       ("rank",)),
    _c("aiinfra_train_checkpoints", "checkpoints", "Checkpoints saved by this process"),
    _g("aiinfra_train_checkpoint_age_seconds", "seconds", "Time since the last checkpoint was saved"),
    _g("aiinfra_train_checkpoint_save_seconds", "seconds", "Duration of the last checkpoint save, background included"),
    _g("aiinfra_train_checkpoint_blocking_seconds", "seconds", "Training time the last checkpoint save blocked"),
    _g("aiinfra_train_restarts", "restarts", "Restarts of this job so far (resumes from a checkpoint)"),
    _g("aiinfra_train_effective_training_time_ratio", "ratio",
       "Productive training time over wall time since the job first started (goodput)"),
    _g("aiinfra_train_predicted_step_time_seconds", "seconds", "The planner's predicted step time for this run"),
    _g("aiinfra_train_power_watts", "watts", "Device power draw (NVML, summed over this node's visible GPUs)"),
    _c("aiinfra_train_energy_joules", "joules", "Device energy spent training (NVML)"),
    _g("aiinfra_train_energy_per_token_joules", "joules", "Device energy per trained token in the last step (NVML)"),
)

SERVE = (
    _g("aiinfra_serve_requests_running", "requests", "Requests in the running batch"),
    _g("aiinfra_serve_requests_waiting", "requests", "Requests queued for the batch"),
    _g("aiinfra_serve_kv_cache_usage_ratio", "ratio", "Share of KV cache blocks held by requests (0..1)"),
    _h("aiinfra_serve_time_to_first_token_seconds", "From arrival to the first generated token", LATENCY_BUCKETS_S),
    _h("aiinfra_serve_inter_token_latency_seconds", "Between successive generated tokens of a request",
       LATENCY_BUCKETS_S),
    _h("aiinfra_serve_e2e_request_latency_seconds", "From arrival to the last token", LATENCY_BUCKETS_S),
    _c("aiinfra_serve_prompt_tokens", "tokens", "Prompt tokens of admitted requests"),
    _c("aiinfra_serve_generation_tokens", "tokens", "Generated tokens"),
    _c("aiinfra_serve_prefix_cache_hit_tokens", "tokens", "Prompt tokens found in the prefix cache"),
    _c("aiinfra_serve_preemptions", "requests", "Requests preempted for lack of KV blocks"),
    _c("aiinfra_serve_requests_finished", "requests", "Finished requests by reason", ("finish_reason",)),
    _c("aiinfra_serve_requests_rejected", "requests", "Requests refused before running, by reason", ("reason",)),
)

ROUTE = (
    _g("aiinfra_route_backend_up", "bool", "1 while the backend passes health checks and is not ejected",
       ("backend",)),
    _g("aiinfra_route_backend_outstanding_requests", "requests",
       "Requests dispatched to the backend and not yet finished", ("backend",), attr="backend_outstanding"),
    _c("aiinfra_route_backend_requests", "requests",
       "Attempts sent to a backend, by HTTP status (or 'error': no response, 'cut': the stream broke)",
       ("backend", "status")),
    _h("aiinfra_route_time_to_first_token_seconds", "From dispatch to the backend's first streamed token",
       LATENCY_BUCKETS_S, ("backend",)),
    _h("aiinfra_route_request_latency_seconds", "From dispatch to the end of the backend's answer",
       LATENCY_BUCKETS_S, ("backend",)),
    _c("aiinfra_route_client_requests", "requests", "Client requests answered, by model and HTTP status",
       ("model", "status")),
    _c("aiinfra_route_retries", "requests", "Attempts sent to another backend after one failed before its first byte",
       ("backend",)),
    _c("aiinfra_route_failovers", "requests",
       "Requests moved to another backend, before the stream started or during it", ("phase",)),
    _c("aiinfra_route_hedges", "requests", "Second copies sent after the hedging delay", ("backend",)),
    _c("aiinfra_route_hedge_wins", "requests", "Hedged copies that answered first"),
    _c("aiinfra_route_ejections", "events", "Outlier ejections", ("backend",)),
    _c("aiinfra_route_stream_errors", "requests",
       "Streams ended with an error event because no backend could continue them"),
    _c("aiinfra_route_cache_lookups", "requests", "Requests the semantic cache looked up"),
    _c("aiinfra_route_cache_hits", "requests", "Lookups answered from the cache", ("match",)),
    _c("aiinfra_route_cache_misses", "requests", "Lookups that went to a backend"),
    _c("aiinfra_route_cache_bypasses", "requests", "Requests not looked up (temperature, Cache-Control, unsupported)",
       ("reason",)),
    _c("aiinfra_route_cache_guard_rejections", "requests",
       "Near entries the guard turned down as a different question"),
    _c("aiinfra_route_cache_stores", "entries", "Answers stored"),
    _c("aiinfra_route_cache_evictions", "entries", "Entries dropped by bytes or TTL"),
    _c("aiinfra_route_cache_tokens_saved", "tokens", "Backend tokens (prompt + completion) that hits did not spend"),
    _g("aiinfra_route_cache_entries", "entries", "Entries held by this process"),
    _g("aiinfra_route_cache_bytes", "bytes", "Bytes of the entries held by this process"),
    _h("aiinfra_route_cache_lookup_seconds", "From the start of a lookup to its hit or miss (embedding included)",
       CACHE_BUCKETS_S),
    _c("aiinfra_route_cascade_decisions", "requests", "Requests to a cascade's virtual model, by the pool that "
       "answered (small, large) and why", ("model", "pool", "reason")),
    MetricSpec("aiinfra_route_cascade_score_ratio", "histogram", "ratio",
               "Confidence scores the cascade judged (a probability)", ("model",),
               (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), attr="cascade_score"),
)

SECTIONS: dict[str, tuple[MetricSpec, ...]] = {"train": TRAIN, "serve": SERVE, "route": ROUTE}
CATALOGUE: dict[str, MetricSpec] = {spec.name: spec for section in SECTIONS.values() for spec in section}


def attribute(spec: MetricSpec, section: str) -> str:
    """The attribute a pillar's metrics object holds `spec` under."""
    return spec.attr or spec.name.removeprefix(f"aiinfra_{section}_")


class MetricSet:
    """Every metric of one section, registered on a registry of its own, as attributes (`metrics.step`)."""

    def __init__(self, section: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        for spec in SECTIONS[section]:
            setattr(self, attribute(spec, section), build(spec, self.registry))


def build(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    """The prometheus-client object of one catalogue entry, registered on `registry`."""
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=registry)


def series_names() -> set[str]:
    """Every series name any aiinfra /metrics can expose."""
    return {name for spec in CATALOGUE.values() for name in spec.series}


def markdown_table(specs: Iterable[MetricSpec] | None = None) -> str:
    """The Markdown table of every metric (the one in docs/observability.md)."""
    rows = ["| metric | type | unit | labels | description |", "|---|---|---|---|---|"]
    for spec in specs if specs is not None else CATALOGUE.values():
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        help_text = spec.help.replace("|", "\\|")
        if spec.buckets:
            help_text += f" (buckets: {', '.join(f'{b:g}' for b in spec.buckets)} s)"
        rows.append(f"| `{spec.exposed}` | {spec.kind} | {spec.unit} | {labels} | {help_text} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the metric catalogue.")
    parser.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/observability.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
    else:
        for spec in CATALOGUE.values():
            print(f"{spec.exposed}\t{spec.kind}\t{spec.unit}\t{','.join(spec.labels)}\t{spec.help}")


if __name__ == "__main__":
    main()
