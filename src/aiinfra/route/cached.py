"""The semantic cache on the request path: answer a hit (as JSON or as a replayed SSE stream), or let the request
go to a backend and keep its answer if it completed. Every response says which in `x-aiinfra-cache`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from aiohttp import web

from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.route.cache.keys import Plan, plan
from aiinfra.route.cache.replay import from_json, from_stream, render_json, render_stream, tokens
from aiinfra.route.requests import ClientError, read_json
from aiinfra.route.stream import StreamState

if TYPE_CHECKING:  # the cache's own packages are optional: nothing here imports them
    from aiinfra.route.cache.semantic import SemanticCache

CACHE_HEADER = "x-aiinfra-cache"
KEY_HEADER = "x-aiinfra-cache-key"


@dataclass
class Outcome:
    """A request that goes to a backend: `lookup` (not yet decided), `miss` (its answer may be stored) or
    `bypass`."""

    status: str
    cache: SemanticCache | None = None
    plan: Plan | None = None
    vector: np.ndarray | None = None
    started: float = field(default_factory=time.perf_counter)

    def headers(self) -> dict[str, str]:
        headers = {CACHE_HEADER: self.status}
        if self.plan is not None:
            headers[KEY_HEADER] = self.plan.key
        return headers

    def _save(self, record: bytes | None) -> None:
        if record is None or self.cache is None or self.plan is None or not self.plan.store:
            return
        cache, plan_, vector = self.cache, self.plan, self.vector
        if vector is not None:
            cache.save(plan_, vector, record)
            return

        async def embed_then_save() -> None:  # the lookup was skipped (no-cache): embed after the answer
            cache.save(plan_, await cache.vector(plan_.text), record)

        cache._background(embed_then_save())

    def save_json(self, payload: bytes, chat: bool) -> None:
        """Keep a non-streamed answer whose every choice finished."""
        self._save(from_json(payload, chat))

    def save_stream(self, state: StreamState) -> None:
        """Keep a stream that ended with its finish and [DONE], uncut."""
        self._save(from_stream(state))


def _tenant(request: web.Request, cache: SemanticCache) -> str | None:
    if not cache.config.per_tenant:
        return None
    return hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()[:16]


def consult(request: web.Request, cache: SemanticCache, metrics: RouteMetrics, body: dict[str, Any],
            chat: bool, model: str) -> web.Response | Outcome:
    """An exact hit's response at once, or the request's outcome so far: `bypass`, or `lookup` (see `resolve`)."""
    planned = plan(body, chat, model, request.headers, cache.config, _tenant(request, cache))
    if isinstance(planned, str):
        metrics.child(metrics.cache_bypasses, planned).inc()
        return Outcome("bypass")
    if not planned.lookup:
        metrics.child(metrics.cache_bypasses, "cache-control").inc()
        return Outcome("bypass", cache, planned)
    entry = cache.exact(planned)
    return Outcome("lookup", cache, planned) if entry is None else hit_response(entry, body, metrics)


async def resolve(outcome: Outcome, body: dict[str, Any]) -> web.Response | None:
    """The semantic lookup: a hit's response, or None (the outcome is then a miss that knows its vector)."""
    assert outcome.cache is not None and outcome.plan is not None
    entry, outcome.vector = await outcome.cache.semantic(outcome.plan, outcome.started)
    outcome.status = "miss" if entry is None else "hit"
    return None if entry is None else hit_response(entry, body, outcome.cache.metrics)


async def open_during_lookup(lookup: asyncio.Task, opening: Awaitable[Any], speculative: bool,
                             failures: tuple[type[BaseException], ...], after_s: float = 0.0) -> Any:
    """A hit's response, or the backend attempt of a miss. Speculatively, the attempt starts `after_s` into the
    lookup if the lookup has not answered by then (a miss waits at most that long for its embedding) and a hit
    cancels it; a lookup that answers within `after_s` never dispatches, so a quick hit costs no backend work."""
    if speculative and after_s > 0:
        try:
            await asyncio.wait_for(asyncio.shield(lookup), after_s)
        except asyncio.TimeoutError:
            pass  # still looking up: dispatch now
        except BaseException:
            if not lookup.done():  # this request was cancelled while it waited
                lookup.cancel()
                opening.close()  # type: ignore[attr-defined]
                raise
    if not speculative or lookup.done():
        try:
            hit = await lookup
        except BaseException:
            opening.close()  # type: ignore[attr-defined] - a coroutine never started
            raise
        if hit is not None:
            opening.close()  # type: ignore[attr-defined]
            return hit
        return await opening
    attempt = asyncio.ensure_future(opening)
    try:
        hit = await lookup
    except BaseException:
        attempt.cancel()
        raise
    if hit is None:
        return await attempt
    attempt.cancel()
    try:
        started = await attempt
    except (asyncio.CancelledError, *failures):
        pass
    else:
        started.close("cancelled")  # it had its first byte before the lookup finished
    return hit


def hit_response(entry: Any, body: dict[str, Any], metrics: RouteMetrics | None = None) -> web.Response:
    """The cached answer, as JSON or as a replayed SSE stream."""
    record = orjson.loads(entry.answer)
    if metrics is not None:
        metrics.cache_tokens_saved.inc(tokens(record))
    headers = {CACHE_HEADER: "hit", KEY_HEADER: entry.id}
    if body.get("stream"):
        return web.Response(body=render_stream(record), content_type="text/event-stream",
                            headers=headers | {"cache-control": "no-cache"})
    return web.Response(body=render_json(record), content_type="application/json", headers=headers)


def _admin_keys(cache: SemanticCache, client_keys: list[str]) -> list[str]:
    env = cache.config.admin_key_env
    return [os.environ[env]] if env and os.environ.get(env) else client_keys


async def invalidate(request: web.Request, cache: SemanticCache | None, client_keys: list[str]) -> web.Response:
    """POST /admin/cache/invalidate {"key": KEY} or {"prefix": TEXT}: drop entries here and in the shared tier."""
    if cache is None:
        raise ClientError(404, "the semantic cache is not enabled ([cache] enabled = true in FLEET.toml)")
    keys = _admin_keys(cache, client_keys)
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    if keys and not any([hmac.compare_digest(given, key.encode()) for key in keys]):
        raise ClientError(401, "invalid or missing admin key", code="invalid_api_key")
    body = await read_json(request, 1 << 16)
    key, prefix = body.get("key"), body.get("prefix")
    if not isinstance(key, str) and not isinstance(prefix, str):
        raise ClientError(400, 'expected {"key": "..."} or {"prefix": "..."}', param="key")
    dropped = await cache.invalidate(key if isinstance(key, str) else None,
                                     prefix if isinstance(prefix, str) else None)
    return web.json_response({"invalidated": dropped})
