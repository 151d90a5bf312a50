"""Routing policies: filters, scorers and pickers, each a pure function of a request and the backends' state.

As in llm-d's inference scheduler: filters drop backends that cannot serve, each scorer gives every remaining
backend a score in [0, 1], and the picker takes the best weighted sum. A policy is a list of (scorer, weight) plus
the filters it needs; none of them touches the network, so each is tested on plain values.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiinfra.route.fleet import GatewayConfig
from aiinfra.route.state import BackendState

CHARS_PER_TOKEN = 4.0  # prompt length is estimated from text; the policies only compare backends with it


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know of a request."""

    model: str
    prefix_blocks: tuple[int, ...] = ()
    session: str | None = None
    region: str = ""
    prompt_chars: int = 0
    max_tokens: int = 16


Scorer = Callable[[RouteRequest, Sequence[BackendState]], list[float]]


def _normalised_low_is_good(values: Sequence[float]) -> list[float]:
    """1 for the lowest value, 0 for the highest, linear between; all 1 when they are equal."""
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    return [(high - value) / (high - low) for value in values]


def queue_scores(request: RouteRequest, backends: Sequence[BackendState]) -> list[float]:
    """Fewer requests in flight (and, for our servers, fewer waiting in the engine) scores higher."""
    return _normalised_low_is_good([b.outstanding + (b.waiting or 0) for b in backends])


def kv_scores(request: RouteRequest, backends: Sequence[BackendState]) -> list[float]:
    """A fuller KV cache (reported by an aiinfra backend's /health) scores lower; unknown counts as empty."""
    return [1.0 - min(1.0, b.kv_cache_usage or 0.0) for b in backends]


def prefix_scores(request: RouteRequest, backends: Sequence[BackendState]) -> list[float]:
    """The share of the prompt's leading blocks the backend was sent before."""
    if not request.prefix_blocks:
        return [0.0] * len(backends)
    return [b.prefix.matched(request.prefix_blocks) / len(request.prefix_blocks) for b in backends]


def predicted_latency_s(request: RouteRequest, backend: BackendState) -> float:
    """Moving-average TTFT plus TPOT x max_tokens; a backend never measured predicts 0 (so it gets tried)."""
    return (backend.ttft_s or 0.0) + (backend.tpot_s or 0.0) * request.max_tokens


def latency_scores(request: RouteRequest, backends: Sequence[BackendState]) -> list[float]:
    """Finagle's peak-EWMA cost, predicted latency x (requests in flight + 1); the lowest cost scores 1."""
    costs = [predicted_latency_s(request, b) * (b.outstanding + 1) for b in backends]
    return _normalised_low_is_good(costs)


def request_cost(request: RouteRequest, backend: BackendState) -> float:
    """Predicted price of the request on this backend, from its per-million-token prices."""
    prompt_tokens = request.prompt_chars / CHARS_PER_TOKEN
    config = backend.config
    return (prompt_tokens * config.cost_per_mtok_in + request.max_tokens * config.cost_per_mtok_out) / 1e6


def cost_scores(request: RouteRequest, backends: Sequence[BackendState]) -> list[float]:
    return _normalised_low_is_good([request_cost(request, b) for b in backends])


SCORER_FUNCTIONS: dict[str, Scorer] = {
    "prefix": prefix_scores, "queue": queue_scores, "kv": kv_scores, "latency": latency_scores, "cost": cost_scores,
}


def pick_weighted(request: RouteRequest, backends: Sequence[BackendState], weights: dict[str, float],
                  rng: random.Random) -> BackendState:
    """The backend with the best weighted sum of scores; ties broken at random (so equal backends share load)."""
    totals = [0.0] * len(backends)
    for name, weight in weights.items():
        if weight:
            for index, score in enumerate(SCORER_FUNCTIONS[name](request, backends)):
                totals[index] += weight * score
    best = max(totals)
    return rng.choice([b for b, total in zip(backends, totals) if total >= best - 1e-12])


def bounded_load(backends: Sequence[BackendState], eps: float) -> list[BackendState]:
    """Backends that would stay within (1 + eps) x the mean load after taking one more request.

    Consistent hashing with bounded loads (Mirrokni et al. 2018), the cap SGLang's and llm-d's prefix routers use
    so that a popular prefix cannot pile every request onto one backend.
    """
    cap = math.ceil((1.0 + eps) * (sum(b.outstanding for b in backends) + 1) / len(backends))
    kept = [b for b in backends if b.outstanding + 1 <= cap]
    return kept or [min(backends, key=lambda b: b.outstanding)]


def prefer_region(backends: Sequence[BackendState], region: str) -> list[BackendState]:
    """The backends of `region` while any has room; all of them (spill-over) once none has."""
    if not region:
        return list(backends)
    local = [b for b in backends if b.config.region == region]
    return local or list(backends)


def least_outstanding(backends: Sequence[BackendState], rng: random.Random) -> BackendState:
    """Power of two choices: the less loaded of two backends drawn at random (Mitzenmacher 2001)."""
    if len(backends) == 1:
        return backends[0]
    first, second = rng.sample(list(backends), 2)
    return first if first.outstanding <= second.outstanding else second


def cheapest_within_slo(request: RouteRequest, backends: Sequence[BackendState], slo_s: float) -> BackendState:
    """The cheapest backend predicted to meet the latency SLO; if none is, the one predicted fastest."""
    meeting = [b for b in backends if predicted_latency_s(request, b) <= slo_s]
    if not meeting:
        return min(backends, key=lambda b: predicted_latency_s(request, b))
    return min(meeting, key=lambda b: (request_cost(request, b), predicted_latency_s(request, b), b.outstanding))


def rendezvous(session: str, backends: Sequence[BackendState]) -> BackendState:
    """Highest-random-weight hashing: a session stays on its backend, and only its sessions move if it goes.

    crc32 rather than hash(): the same on every gateway process, so affinity holds behind a load balancer.
    """
    return max(backends, key=lambda b: zlib.crc32(f"{session}\x00{b.name}".encode()))


DEFAULT_WEIGHTS = {"prefix": {"prefix": 3.0, "queue": 2.0, "kv": 2.0}, "latency": {"latency": 1.0}}


class Policy:
    """The configured policy: which filters run and how the remaining backends are chosen."""

    def __init__(self, config: GatewayConfig, seed: int | None = None):
        self.name = config.policy
        self.weights = dict(config.weights) or DEFAULT_WEIGHTS.get(self.name, {})
        self.config = config
        self.rng = random.Random(seed)
        self.turn = 0  # round robin's position

    @property
    def uses_prefix(self) -> bool:
        """Whether requests need their prefix blocks hashed (only the prefix scorer reads them)."""
        return bool(self.weights.get("prefix"))

    def pick(self, request: RouteRequest, available: Sequence[BackendState]) -> BackendState:
        """Choose among backends that can take the request now (the caller filtered availability)."""
        candidates = prefer_region(available, request.region or self.config.region)
        if self.name == "round_robin":
            self.turn += 1
            return candidates[self.turn % len(candidates)]
        if self.name == "session" and request.session:
            return rendezvous(request.session, candidates)
        if self.name == "cost":
            return cheapest_within_slo(request, candidates, self.config.latency_slo_ms / 1000)
        if self.config.weights or self.name in DEFAULT_WEIGHTS:
            if self.weights.get("prefix"):
                candidates = bounded_load(candidates, self.config.load_cap_eps)
            return pick_weighted(request, candidates, self.weights, self.rng)
        return least_outstanding(candidates, self.rng)
