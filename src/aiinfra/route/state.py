"""What the gateway knows of each backend, updated from events: dispatched, first byte, finished, failed, checked.

Load is counted from dispatch to the end of the stream (a health check never touches it). Outlier detection is a
small state machine per backend, as Envoy's: healthy -> ejected until T (after N consecutive failures) -> back,
with the n-th ejection lasting n x the base; a pool never ejects more than its allowed share at once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from yarl import URL

from aiinfra.route.fleet import BackendConfig, OutlierConfig

EWMA_ALPHA = 0.2  # weight of the newest sample: about the last ten requests dominate


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + EWMA_ALPHA * (sample - previous)


@dataclass
class Outlier:
    """Consecutive failures, ejection deadline and count of one backend."""

    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, now: float, config: OutlierConfig, may_eject: bool) -> bool:
        """Count a failure; True when it ejects the backend (only if the pool allows one more ejection)."""
        self.consecutive_failures += 1
        if self.consecutive_failures < config.consecutive_failures or self.ejected(now) or not may_eject:
            return False
        self.ejections += 1
        self.ejected_until = now + min(config.base_ejection_s * self.ejections, config.max_ejection_s)
        self.consecutive_failures = 0
        return True


class PrefixIndex:
    """The chained block hashes a backend has been sent, most recent last, at most `capacity` of them (LRU).

    An approximate view of the backend's prefix cache (llm-d's approximate prefix scorer): the gateway cannot see
    the cache, but a backend that was sent a prompt's leading blocks most likely still holds them.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def matched(self, blocks: tuple[int, ...]) -> int:
        """How many of the leading blocks this backend has seen."""
        count = 0
        for block in blocks:
            if block not in self.blocks:
                break
            count += 1
        return count

    def add(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            self.blocks[block] = None
            self.blocks.move_to_end(block)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


@dataclass
class BackendState:
    """One backend: its config, health, load, latency averages, outlier state and prefix index."""

    config: BackendConfig
    prefix: PrefixIndex
    up: bool = True  # optimistic until the first health check says otherwise
    checked: bool = False  # a health check has passed at least once
    server: str = "openai"  # "aiinfra" once /v1/models says so (or the config does)
    outstanding: int = 0
    ttft_s: float | None = None  # moving averages
    tpot_s: float | None = None
    waiting: int | None = None  # from an aiinfra server's /health
    kv_cache_usage: float | None = None
    cooldown_until: float = 0.0  # a 429/503's Retry-After
    outlier: Outlier = field(default_factory=Outlier)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request: content type and key
    _urls: dict[str, URL] = field(default_factory=dict)

    def __post_init__(self) -> None:
        key = self.config.key()
        self.headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})

    def url(self, path: str) -> URL:
        """The backend's URL for `path`, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.config.url + path)
        return url

    @property
    def name(self) -> str:
        return self.config.name

    def available(self, now: float) -> bool:
        """Up, not ejected, not cooling down after a Retry-After, and under its concurrency cap."""
        if not self.up or self.outlier.ejected(now) or now < self.cooldown_until:
            return False
        return self.config.max_concurrency is None or self.outstanding < self.config.max_concurrency

    def record_latency(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft_s = _ewma(self.ttft_s, ttft_s)
        if tpot_s is not None:
            self.tpot_s = _ewma(self.tpot_s, tpot_s)


class LatencyWindow:
    """The last `size` samples of a pool's time to first byte, for the hedging delay (a quantile)."""

    def __init__(self, size: int = 512):
        self.samples: deque[float] = deque(maxlen=size)
        self._sorted: list[float] | None = None

    def add(self, sample: float) -> None:
        self.samples.append(sample)
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the window, or None before 20 samples (too few to say what is slow)."""
        if len(self.samples) < 20:
            return None
        if self._sorted is None:
            self._sorted = sorted(self.samples)
        return self._sorted[min(len(self._sorted) - 1, int(q * len(self._sorted)))]


class Budget:
    """A share of requests that may take an extra attempt (retries or hedges): a token bucket that each request
    fills by `ratio` and each extra attempt drains by one, so a partial outage cannot multiply the load."""

    def __init__(self, ratio: float, burst: float = 10.0):
        self.ratio, self.burst = ratio, burst
        self.tokens = burst if ratio > 0 else 0.0

    def on_request(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0 - 1e-9:  # ten requests at ratio 0.1 earn one, despite rounding
            self.tokens -= 1.0
            return True
        return False

