"""One attempt at a request on one backend: send it, wait for the first byte that can be passed on, then relay.

An attempt counts as load on its backend from dispatch until it is closed (its stream ended, failed, lost a hedge
or its client left), whatever happens in between, so load is never lost or counted twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.route.state import BackendState
from aiinfra.route.stream import DONE, SSEParser

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def carries_token(data: str) -> bool:
    """Whether an event holds generated text, a finish, an error or the end: anything but an empty announcement."""
    if data == DONE:
        return True
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(chunk, dict) or "error" in chunk:
        return True
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or choice.get("finish_reason") is not None:
            return True
        if delta.get("tool_calls") or delta.get("reasoning_content"):
            return True
    return not chunk.get("choices")  # a usage-only chunk comes last


class AttemptFailed(Exception):
    """The backend could not answer; `status` is its HTTP status, or None when there was no response."""

    def __init__(self, backend: BackendState, message: str, status: int | None = None,
                 retry_after_s: float | None = None, connect_refused: bool = False):
        super().__init__(f"{backend.name}: {message}")
        self.backend, self.status, self.retry_after_s, self.connect_refused = backend, status, retry_after_s, \
            connect_refused


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form counts as one second)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


class Attempt:
    """A request in flight on one backend."""

    def __init__(self, backend: BackendState, session: aiohttp.ClientSession, metrics: RouteMetrics, path: str,
                 body: dict[str, Any], stream: bool):
        self.backend, self.session, self.metrics, self.path, self.stream = backend, session, metrics, path, stream
        self.body = body | {"model": backend.config.backend_model}
        self.exact = backend.server == "aiinfra"  # its chunks carry token ids: a cut stream continues exactly
        self.response: aiohttp.ClientResponse | None = None
        self.status = 0
        self.payload = b""  # the whole body of a non-streamed answer, or of a backend error passed to the client
        self.content_type = "application/json"
        self.first: list[tuple[bytes, str]] = []  # the first events of a stream, read before it was accepted
        self.parser = SSEParser()
        self.dispatched = time.perf_counter()
        self.first_byte_s: float | None = None
        self.closed = False
        backend.outstanding += 1

    async def open(self) -> None:
        """Send the request and read up to the first event (or the whole answer); AttemptFailed if it cannot."""
        try:
            self.response = await self.session.post(self.backend.url(self.path), data=orjson.dumps(self.body),
                                                    headers=self.backend.headers)
        except aiohttp.ClientConnectorError as error:
            raise AttemptFailed(self.backend, f"cannot connect: {error.os_error or error}",
                                connect_refused=isinstance(error.os_error, ConnectionRefusedError)) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise AttemptFailed(self.backend, f"no response: {error!r}") from None
        self.status = self.response.status
        self.content_type = self.response.headers.get("content-type", "application/json").split(";")[0]
        try:
            if self.status != 200 or not self.stream:
                self.payload = await self.response.read()
            else:
                # Up to the first event that carries a token (or ends the stream): a chat stream's role
                # announcement comes at once even from a server whose model is stalled, so it decides nothing.
                while not self.first or not any(carries_token(data) for _, data in self.first):
                    chunk = await self.response.content.readany()
                    if not chunk:
                        raise AttemptFailed(self.backend, "the stream ended before its first token", 200)
                    self.first += self.parser.feed(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise AttemptFailed(self.backend, f"broke before the first byte: {error!r}", self.status) from None
        self.first_byte_s = time.perf_counter() - self.dispatched
        if self.status in RETRYABLE_STATUS:
            raise AttemptFailed(self.backend, f"answered {self.status}", self.status,
                                retry_after_seconds(self.response.headers.get("retry-after")))
        if self.stream and self.status == 200:
            self.metrics.child(self.metrics.time_to_first_token_seconds, self.backend.name).observe(self.first_byte_s)

    async def batches(self) -> AsyncIterator[list[tuple[bytes, str]]]:
        """The stream's events, a list per network read (the ones read by `open` first), so that what arrived
        together is passed on in one write; the backend's errors propagate."""
        assert self.response is not None
        if self.first:
            yield self.first
        self.first = []
        while True:
            chunk = await self.response.content.readany()
            if not chunk:
                return
            events = self.parser.feed(chunk)
            if events:
                yield events

    async def finish(self) -> None:
        """After the last event: read the body's end, so that the connection goes back to the pool for reuse."""
        content = self.response.content if self.response is not None else None
        if content is None or content.at_eof():  # the usual case: the end came with the last event
            return

        async def drain() -> None:
            while await content.readany():
                pass

        try:
            await asyncio.wait_for(drain(), timeout=1.0)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # it will be closed instead: only a connection is lost

    def close(self, outcome: str) -> None:
        """Release the connection (aborting the backend's request if it is still running) and the load."""
        if self.closed:
            return
        self.closed = True
        if self.response is not None:
            self.response.close()
        backend = self.backend
        backend.outstanding -= 1
        metrics = self.metrics
        metrics.child(metrics.backend_requests, backend.name, outcome).inc()
        if outcome == "200":
            metrics.child(metrics.request_latency_seconds, backend.name).observe(time.perf_counter() - self.dispatched)
