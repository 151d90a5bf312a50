"""Answering a client: a non-streamed answer as the backend gave it, or a stream relayed event by event that fails
over to another backend mid-answer, so that the client sees one uninterrupted stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from aiinfra.route.backend_client import Attempt, AttemptFailed
from aiinfra.route.gateway import BodyFor, Gateway, NoBackend, Tried
from aiinfra.route.policies import RouteRequest
from aiinfra.route.state import BackendState
from aiinfra.route.stream import (
    DONE,
    StreamState,
    error_event,
    is_error_event,
    sse,
    strip_token_ids,
    strip_token_ids_raw,
)

BACKEND_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class ClientGone(Exception):
    """The client closed its connection."""


def _completion_tokens(payload: bytes) -> int:
    try:
        return int(orjson.loads(payload)["usage"]["completion_tokens"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1


def answer(attempt: Attempt, gateway: Gateway) -> web.Response:
    """A non-streamed answer (or a backend's client error) passed on as it came."""
    status = str(attempt.status)
    if attempt.status == 200:
        gateway.record_success(attempt, _completion_tokens(attempt.payload))
    attempt.close(status)
    return web.Response(body=attempt.payload, status=attempt.status, content_type=attempt.content_type,
                        headers={"x-aiinfra-backend": attempt.backend.name})


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionResetError, RuntimeError) as error:  # RuntimeError: aiohttp's closed-transport write
        raise ClientGone() from error


async def _pump(attempt: Attempt, response: web.StreamResponse, state: StreamState, continuing: bool,
                strip: bool) -> bool:
    """Relay the attempt's events to the client until `[DONE]` (True) or until the backend fails (False).

    Events that arrived in one read leave in one write; none waits for a later one. A healthy stream's events pass
    as bytes (only the token ids the gateway asked for are cut out); a continuation's are rewritten."""
    strip_raw = strip and attempt.exact
    try:
        async for events in attempt.batches():
            out = []
            done = False
            for raw, data in events:
                if data == DONE:
                    done = True
                    break
                if is_error_event(data):
                    await _write(response, b"".join(out))
                    return False  # the backend gave up mid-stream (an aiinfra server whose engine died): fail over
                if continuing:
                    try:
                        chunk = state.rewrite(orjson.loads(data))
                    except orjson.JSONDecodeError:
                        chunk = None
                    if chunk is None:
                        continue
                    state.sent.append(orjson.dumps(chunk).decode())
                    out.append(sse(strip_token_ids(chunk) if strip else chunk))
                    continue
                state.sent.append(data)
                out.append(strip_token_ids_raw(raw) if strip_raw else raw)
            if out:
                await _write(response, b"".join(out))
            if done:
                await attempt.finish()
                return True
    except BACKEND_ERRORS:
        return False
    return False


def _continuation_body(state: StreamState, body: dict[str, Any], exact_so_far: bool) -> BodyFor:
    def body_for(backend: BackendState) -> dict[str, Any] | None:
        return state.continuation(body, exact=exact_so_far and backend.server == "aiinfra")

    return body_for


async def _continue(gateway: Gateway, state: StreamState, route: RouteRequest, path: str, body: dict[str, Any],
                    tried: Tried, exact_so_far: bool) -> Attempt | None:
    """An attempt on another backend that continues the answer, or None where none can."""
    try:
        attempt = await gateway.open(route.model, route, path, _continuation_body(state, body, exact_so_far), True,
                                     tried)
    except (NoBackend, AttemptFailed):
        return None
    if attempt.status != 200:  # the backend refused the continuation
        attempt.close(str(attempt.status))
        return None
    gateway.metrics.failovers.labels("mid_stream").inc()
    return attempt


async def stream(request: web.Request, gateway: Gateway, attempt: Attempt, route: RouteRequest, path: str,
                 body: dict[str, Any], tried: Tried, strip: bool, headers: dict[str, str] | None = None,
                 on_complete: Callable[[StreamState], None] | None = None) -> web.StreamResponse:
    """Relay a stream; on a backend's failure continue the same answer elsewhere, or end with an error event.

    `on_complete` sees the stream's state when one backend sent the whole answer, uncut (what may be cached)."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           "x-accel-buffering": "no", "x-aiinfra-backend": attempt.backend.name,
                                           **(headers or {})})
    state = StreamState(chat=path.endswith("chat/completions"))
    exact_so_far, continuing = True, False
    current: Attempt | None = attempt
    try:
        await response.prepare(request)
        while current is not None:
            exact_so_far = exact_so_far and current.exact
            if await _pump(current, response, state, continuing, strip):
                gateway.record_success(current, len(state.sent))
                current.close("200")
                if on_complete is not None and not continuing:
                    state.summarise()
                    on_complete(state)
                break
            current.close("cut")
            gateway.record_failure(AttemptFailed(current.backend, "the stream broke"))
            state.summarise()
            if state.finish_reason is not None:
                break  # the answer was complete; only the end of the stream was lost
            current = await _continue(gateway, state, route, path, body, tried, exact_so_far)
            continuing = True
        if current is None:
            gateway.metrics.stream_errors.inc()
            await _write(response, error_event("the backend failed mid-stream and no other could continue the answer",
                                               "upstream_failed"))
        try:
            await response.write_eof(sse(DONE))  # the last event and the end of the body in one write
        except (ConnectionResetError, RuntimeError) as error:
            raise ClientGone() from error
    except (ClientGone, ConnectionResetError):
        pass
    finally:
        if current is not None:
            current.close("cancelled")  # a no-op unless the client left mid-stream: this aborts the backend's work
    return response
