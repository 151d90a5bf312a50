"""The gateway's core: backend state per pool, picking a backend, and getting a first byte with retries and hedges.

One `Gateway` per process. Its state (load, moving averages, ejections, the prefix index, budgets) is that
process's view: several gateway processes each count only their own requests (see docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.route.backend_client import Attempt, AttemptFailed
from aiinfra.route.fleet import BackendConfig, FleetConfig
from aiinfra.route.policies import Policy, RouteRequest
from aiinfra.route.state import BackendState, Budget, LatencyWindow, PrefixIndex

BodyFor = Callable[[BackendState], "dict[str, Any] | None"]


@dataclass
class Tried:
    """The backends a request has been sent to, and how many more it may try."""

    names: set[str]
    retries_left: int


class NoBackend(Exception):
    """No backend of the pool can take the request now (all down, ejected, cooling down or full)."""


class Gateway:
    """Pools of backends by model name, the policy, the budgets and the HTTP client they share."""

    def __init__(self, fleet: FleetConfig, metrics: RouteMetrics | None = None, seed: int | None = None):
        self.config = fleet.gateway
        self.metrics = metrics or RouteMetrics()
        self.policy = Policy(self.config, seed)
        self.pools: dict[str, list[BackendState]] = {
            model: [self._state(backend) for backend in backends] for model, backends in fleet.pools().items()
        }
        self.backends = [backend for pool in self.pools.values() for backend in pool]
        self.cascades = {cascade.model: cascade for cascade in fleet.cascade}  # virtual models over two pools
        self.first_byte = {model: LatencyWindow() for model in self.pools}
        self.hedge_budget = Budget(self.config.hedge_budget_ratio)
        self.in_flight = 0
        self.retries_in_flight = 0
        self.session: aiohttp.ClientSession | None = None
        self.cache: Any = None  # the SemanticCache when FLEET.toml enables it (its packages are optional)

    def _state(self, config: BackendConfig) -> BackendState:
        state = BackendState(config, PrefixIndex(self.config.prefix_blocks_per_backend))
        state.server = "aiinfra" if config.server == "aiinfra" else "openai"
        # Read when scraped, never written on the request path.
        self.metrics.backend_up.labels(config.name).set_function(
            lambda: int(state.up and not state.outlier.ejected(time.monotonic())))
        self.metrics.backend_outstanding.labels(config.name).set_function(lambda: state.outstanding)
        return state

    async def start(self) -> None:
        """Open the shared HTTP client (call on the event loop that will serve)."""
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- choosing -----------------------------------------------------------------------------------------------

    def available(self, model: str, exclude: set[str]) -> list[BackendState]:
        now = time.monotonic()
        return [b for b in self.pools[model] if b.name not in exclude and b.available(now)]

    def choose(self, model: str, request: RouteRequest, exclude: set[str]) -> BackendState | None:
        """The policy's pick among the backends of `model` that can take a request now."""
        candidates = self.available(model, exclude)
        if not candidates:
            return None
        backend = self.policy.pick(request, candidates)
        if request.prefix_blocks:
            backend.prefix.add(request.prefix_blocks)
        return backend

    def hedge_delay_s(self, model: str) -> float | None:
        """The pool's recent first-byte quantile, or None while too few requests were seen to know it."""
        quantile = self.first_byte[model].quantile(self.config.hedge_quantile)
        if quantile is None:
            return None
        return max(quantile, self.config.hedge_min_delay_ms / 1000)

    # -- outcomes -----------------------------------------------------------------------------------------------

    def record_failure(self, failure: AttemptFailed) -> None:
        """A failed attempt: cool down on Retry-After, count towards ejection, mark down if nothing listens."""
        backend = failure.backend
        now = time.monotonic()
        if failure.retry_after_s is not None:  # "busy, come back then" (429, or 503 with Retry-After)
            backend.cooldown_until = now + failure.retry_after_s
            return  # overload, not a fault: cool down without counting towards ejection
        if failure.connect_refused:
            backend.up = False
        pool = self.pools[backend.config.model]
        ejected_now = sum(b.outlier.ejected(now) for b in pool)
        may_eject = ejected_now < max(1, math.floor(self.config.outlier.max_ejected_fraction * len(pool)))
        if backend.outlier.record_failure(now, self.config.outlier, may_eject):
            self.metrics.ejections.labels(backend.name).inc()

    def record_success(self, attempt: Attempt, tokens: int) -> None:
        backend = attempt.backend
        backend.outlier.record_success()
        elapsed = time.perf_counter() - attempt.dispatched
        if attempt.stream:
            ttft = attempt.first_byte_s
            tpot = (elapsed - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
            backend.record_latency(ttft, tpot)
        else:
            backend.record_latency(None, elapsed / max(tokens, 1))

    # -- the first byte -----------------------------------------------------------------------------------------

    def _attempt(self, model: str, request: RouteRequest, path: str, body_for: BodyFor, stream: bool,
                 exclude: set[str]) -> Attempt | None:
        """An attempt on the policy's pick among backends not tried yet (not sent yet); None when there is none."""
        assert self.session is not None
        while (backend := self.choose(model, request, exclude)) is not None:
            exclude.add(backend.name)
            body = body_for(backend)
            if body is not None:  # None: this kind of server cannot take it (a continuation it cannot do)
                return Attempt(backend, self.session, self.metrics, path, body, stream)
        return None

    def _retry(self, model: str, request: RouteRequest, path: str, body_for: BodyFor, stream: bool,
               tried: Tried) -> Attempt | None:
        """Another attempt after a failure, if the request has retries left and the retry budget allows one."""
        if tried.retries_left <= 0 or not self._may_retry():
            return None
        attempt = self._attempt(model, request, path, body_for, stream, tried.names)
        if attempt is not None:
            tried.retries_left -= 1
            self.metrics.retries.labels(attempt.backend.name).inc()
            self.metrics.failovers.labels("before_stream").inc()
        return attempt

    def _may_retry(self) -> bool:
        """Envoy's retry budget: retries in flight within a share of all requests in flight (or a small floor)."""
        return self.retries_in_flight < max(self.config.min_retry_concurrency,
                                            self.config.retry_budget_ratio * self.in_flight)

    def _failed(self, attempt: Attempt, failure: AttemptFailed) -> None:
        attempt.close(str(failure.status) if failure.status else "error")
        self.record_failure(failure)

    async def open(self, model: str, request: RouteRequest, path: str, body_for: BodyFor, stream: bool,
                   tried: Tried) -> Attempt:
        """An attempt that has produced its first byte (or a client error to pass on), retrying failures on other
        backends and hedging a slow first attempt; AttemptFailed or NoBackend when nothing could answer.

        `body_for(backend)` is the request body for that backend (None if it cannot serve it); `tried` names the
        backends tried so far and holds the retries left, for this call and the next (a failover)."""
        attempt = self._attempt(model, request, path, body_for, stream, tried.names)
        if attempt is None:
            raise NoBackend(model)
        hedge_delay = self.hedge_delay_s(model) if self.config.hedge else None
        if hedge_delay is None:
            return await self._open_in_turn(attempt, model, request, path, body_for, stream, tried)
        return await self._open_hedged(attempt, hedge_delay, model, request, path, body_for, stream, tried)

    async def _open_in_turn(self, attempt: Attempt, model: str, request: RouteRequest, path: str,
                            body_for: BodyFor, stream: bool, tried: Tried) -> Attempt:
        """One attempt at a time, the next only after the previous failed (no task, no timer: the common path)."""
        retrying = False
        try:
            while True:
                try:
                    await attempt.open()
                except AttemptFailed as failure:
                    self._failed(attempt, failure)
                    next_attempt = self._retry(model, request, path, body_for, stream, tried)
                    if next_attempt is None:
                        raise
                    if not retrying:
                        retrying = True
                        self.retries_in_flight += 1
                    attempt = next_attempt
                    continue
                except BaseException:
                    attempt.close("cancelled")
                    raise
                self._won(attempt, {}, model)
                return attempt
        finally:
            if retrying:
                self.retries_in_flight -= 1

    async def _open_hedged(self, attempt: Attempt, hedge_delay: float, model: str, request: RouteRequest, path: str,
                           body_for: BodyFor, stream: bool, tried: Tried) -> Attempt:
        """Attempts as tasks: a second copy if the first has no first byte after `hedge_delay`, the loser cancelled."""
        tasks: dict[asyncio.Task, Attempt] = {asyncio.create_task(attempt.open()): attempt}
        delay: float | None = hedge_delay
        last_failure: AttemptFailed | None = None
        retrying = False
        try:
            while tasks:
                done, _ = await asyncio.wait(tasks, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the hedging delay passed without a first byte
                    delay = None  # one hedge per request
                    if self.available(model, tried.names) and self.hedge_budget.try_spend():
                        hedge = self._attempt(model, request, path, body_for, stream, tried.names)
                        if hedge is not None:
                            self.metrics.hedges.labels(hedge.backend.name).inc()
                            tasks[asyncio.create_task(hedge.open())] = hedge
                    continue
                for task in done:
                    finished = tasks.pop(task)
                    failure = task.exception()
                    if failure is None:
                        self._won(finished, tasks, model)
                        return finished
                    assert isinstance(failure, AttemptFailed)
                    self._failed(finished, failure)
                    last_failure = failure
                if tasks:
                    continue
                retry = self._retry(model, request, path, body_for, stream, tried)
                if retry is None:
                    assert last_failure is not None
                    raise last_failure
                tasks[asyncio.create_task(retry.open())] = retry
                if not retrying:
                    retrying = True
                    self.retries_in_flight += 1
            raise AssertionError("unreachable: the loop returns or raises")
        finally:
            if retrying:
                self.retries_in_flight -= 1
            for task, pending in tasks.items():  # hedges that lost, or everything on cancellation
                task.cancel()
                pending.close("cancelled")

    def _won(self, attempt: Attempt, others: dict[asyncio.Task, Attempt], model: str) -> None:
        if others:
            first = min(others.values(), key=lambda a: a.dispatched)
            if first.dispatched < attempt.dispatched:
                self.metrics.hedge_wins.inc()
        if attempt.first_byte_s is not None and attempt.status == 200:
            self.first_byte[model].add(attempt.first_byte_s)
