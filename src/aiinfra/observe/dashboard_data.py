"""What `aiinfra dashboard` draws, read from what a user would scrape: run directories' JSONL and /metrics.

A `RunSource` follows one run directory's metrics.jsonl (new lines only, a torn last line left for the next read)
and its observe.json (the planner's prediction). A `ScrapeSource` fetches one /metrics endpoint (a server's or the
gateway's), parses it with prometheus-client's own parser, and turns counters into rates and histograms into
p50/p99 over a sliding window, as Prometheus' rate() and histogram_quantile() would.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aiinfra.observe.catalogue import INTER_TOKEN_SLO_S, TTFT_SLO_S
from aiinfra.observe.train_metrics import read_observe_file

MAX_POINTS = 2000  # per series: the page stays light over a long run
STEP_TIME_WINDOW = 50  # steps in the rolling p50/p99 of the step time
RATE_WINDOW_S = 30.0  # seconds of history behind a rate or a latency quantile


def quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linearly interpolated."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class RunSource:
    """One training run directory, read incrementally."""

    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    @property
    def name(self) -> str:
        return self.run_dir.name

    def poll(self) -> None:
        """Read the lines appended to metrics.jsonl since the last poll; start over if the file was rewritten
        (a resumed run truncates the steps lost in a crash)."""
        path = self.run_dir / "metrics.jsonl"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size < self._offset:
            self.records, self._offset = [], 0
        with open(path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                self.records.append(record)
        del self.records[:-MAX_POINTS]

    def snapshot(self) -> dict[str, Any]:
        """Series for the training panels: x is the step."""
        records, info = self.records, read_observe_file(self.run_dir)
        steps = [r["step"] for r in records]
        p50, p99 = [], []
        for index in range(len(records)):
            window = sorted(r["step_time_s"] for r in records[max(0, index - STEP_TIME_WINDOW + 1) : index + 1])
            p50.append(quantile(window, 0.5))
            p99.append(quantile(window, 0.99))
        world = len(records[-1].get("rank_step_time_s", [0])) if records else 0
        events = {"checkpoint": [], "restart": []}
        for previous, record in zip([{}, *records], records):
            if record.get("checkpoint_saves", 0) > previous.get("checkpoint_saves", 0):
                events["checkpoint"].append(record["step"])
            if record.get("restarts", 0) > previous.get("restarts", 0):
                events["restart"].append(record["step"])
        heat = [r.get("rank_compute_s_step") or [r["step_time_s"]] for r in records]
        return {
            "name": self.name,
            "path": str(self.run_dir),
            "step": steps,
            "loss": [r["loss"] for r in records],
            "val_loss": [r.get("val_loss") for r in records],
            "tokens_per_s": [r["tokens_per_s"] for r in records],
            "mfu": [r["mfu"] for r in records],
            "step_time_p50_s": p50,
            "step_time_p99_s": p99,
            "predicted_step_time_s": info.get("predicted_step_time_s"),
            "prediction_source": info.get("prediction_source", "no observe.json in the run directory"),
            "ranks": world,
            "rank_compute_s": heat,
            "rank_memory_bytes": [r.get("rank_peak_memory_bytes", []) for r in records],
            "straggler_rank": [r.get("straggler_rank") for r in records],
            "events": events,
            "metrics_url": info.get("metrics_url"),
        }


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(series name, sorted labels): value} of a text exposition (prometheus-client's parser)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **match: str) -> float | None:
    """Sum of every series `name` whose labels include `match` (None when there is none)."""
    values = [v for (n, labels), v in samples.items() if n == name and all((k, w) in labels for k, w in match.items())]
    return sum(values) if values else None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    count = buckets[bounds[-1]] if bounds else 0
    if count <= 0:
        return None
    rank, previous_bound, previous_count = q * count, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return previous_bound
            width = buckets[bound] - previous_count
            return previous_bound + (bound - previous_bound) * ((rank - previous_count) / width if width else 1.0)
        previous_bound, previous_count = bound, buckets[bound]
    return previous_bound


def bucket_counts(samples: dict, name: str) -> dict[float, float]:
    """Cumulative counts per upper bound of histogram `name`, summed over its other labels."""
    buckets: dict[float, float] = {}
    for (series, labels), value in samples.items():
        if series == f"{name}_bucket":
            bound = float(dict(labels)["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


@dataclass
class ScrapeSource:
    """One /metrics endpoint of a server (`aiinfra_serve_*`) or the gateway (`aiinfra_route_*`)."""

    url: str
    history: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))  # (unix s, samples)
    series: dict[str, deque] = field(default_factory=dict)
    error: str | None = None
    kind: str = "unknown"

    def poll(self, client: httpx.Client) -> None:
        """Scrape once and append one point to every series."""
        try:
            response = client.get(self.url)
            response.raise_for_status()
            samples = parse_samples(response.text)
        except (httpx.HTTPError, ValueError) as error:
            self.error = f"{type(error).__name__}: {error}"
            return
        self.error = None
        now = time.time()
        self.history.append((now, samples))
        while len(self.history) > 2 and now - self.history[1][0] > RATE_WINDOW_S:
            self.history.popleft()
        self.kind = "route" if any(n.startswith("aiinfra_route_") for n, _ in samples) else "serve"
        for key, value in self._point(samples).items():
            self.series.setdefault(key, deque(maxlen=MAX_POINTS)).append(value)
        self.series.setdefault("t", deque(maxlen=MAX_POINTS)).append(now)

    def _window(self) -> tuple[float, dict, dict]:
        (start, old), (end, new) = self.history[0], self.history[-1]
        return max(end - start, 1e-9), old, new

    def _rate(self, name: str, **match: str) -> float | None:
        elapsed, old, new = self._window()
        now, before = total(new, name, **match), total(old, name, **match)
        if now is None or len(self.history) < 2:
            return None
        return (now - (before or 0.0)) / elapsed

    def _quantile(self, name: str, q: float) -> float | None:
        _, old, new = self._window()
        recent, earlier = bucket_counts(new, name), bucket_counts(old, name)
        if len(self.history) >= 2:
            recent = {bound: count - earlier.get(bound, 0.0) for bound, count in recent.items()}
        return histogram_quantile(q, recent)

    def _point(self, samples: dict) -> dict[str, float | None]:
        prefix = f"aiinfra_{self.kind}"
        point: dict[str, float | None] = {}
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            point[f"ttft_{label}_s"] = self._quantile(f"{prefix}_time_to_first_token_seconds", q)
            point[f"itl_{label}_s"] = (self._quantile(f"{prefix}_inter_token_latency_seconds", q)
                                       if self.kind == "serve" else None)
        if self.kind == "serve":
            point["request_rate"] = self._rate("aiinfra_serve_requests_finished_total")
            point["running"] = total(samples, "aiinfra_serve_requests_running")
            point["waiting"] = total(samples, "aiinfra_serve_requests_waiting")
            point["kv_cache_usage_ratio"] = total(samples, "aiinfra_serve_kv_cache_usage_ratio")
            hits, prompts = (self._rate("aiinfra_serve_prefix_cache_hit_tokens_total"),
                             self._rate("aiinfra_serve_prompt_tokens_total"))
        else:
            point["request_rate"] = self._rate("aiinfra_route_client_requests_total")
            point["running"] = total(samples, "aiinfra_route_backend_outstanding_requests")
            up = [v for (n, _), v in samples.items() if n == "aiinfra_route_backend_up"]
            point["backends_up"] = sum(up) if up else None
            point["backends_total"] = float(len(up)) if up else None
            hits = self._rate("aiinfra_route_cache_hits_total")
            prompts = self._rate("aiinfra_route_cache_lookups_total")
        point["cache_hit_ratio"] = hits / prompts if hits is not None and prompts else None
        return point

    def snapshot(self) -> dict[str, Any]:
        """Series for the serving or gateway panels: x is unix time."""
        backends = {}
        if self.history:
            for (name, labels), value in self.history[-1][1].items():
                if name == "aiinfra_route_backend_up":
                    backends[dict(labels)["backend"]] = value
        return {
            "url": self.url, "kind": self.kind, "error": self.error, "backend_health": backends,
            "ttft_slo_s": TTFT_SLO_S, "itl_slo_s": INTER_TOKEN_SLO_S,
            **{key: list(values) for key, values in self.series.items()},
        }
