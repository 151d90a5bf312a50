"""Admission: the cheap checks every request passes before the model sees it, and the bounded queue.

In this order, so that a flood of bad or excess requests costs little: API key (401, compared in constant time),
body size (413), JSON and parameters (400), the model's name (404), the engine being alive and room in the queue
counted in sequences (503: every prompt of a request times its `n`); then, once the prompt is tokenized, room in
the queue counted in prompt tokens (503). A request holds its place in both counts until it produces its first
token (tokens) or ends (sequences).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError

from aiinfra.observe.serve_metrics import ServeMetrics
from aiinfra.serve.async_engine import AsyncEngine, Delta
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.protocol import UNSUPPORTED_SAMPLING_FIELDS, ApiError, ChatRequest, CommonRequest

ParsedRequest = TypeVar("ParsedRequest", bound=CommonRequest)


@dataclass
class ServerConfig:
    """Limits and access control of the HTTP layer."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_waiting_requests: int = 256  # queued beyond the running batch
    max_waiting_tokens: int = 1 << 18  # prompt tokens of requests that have not produced their first token
    request_timeout_s: float = 600.0
    retry_after_s: int = 1


class Tracked:
    """A sequence's deltas, holding its place in the admission counts from creation until it ends or is dropped.

    A class rather than an async generator: a generator that is never started never runs its `finally`.
    """

    def __init__(self, gate: Gate, generator: AsyncIterator[Delta], prompt_tokens: int):
        self.gate, self.generator, self.prompt_tokens = gate, generator, prompt_tokens
        gate.in_flight += 1
        gate.queued_tokens += prompt_tokens
        self.queued = self.live = True

    def _unqueue(self) -> None:
        if self.queued:
            self.gate.queued_tokens -= self.prompt_tokens
            self.queued = False

    def _release(self) -> None:
        self._unqueue()
        if self.live:
            self.gate.in_flight -= 1
            self.live = False

    def __aiter__(self) -> Tracked:
        return self

    async def __anext__(self) -> Delta:
        try:
            delta = await self.generator.__anext__()
        except BaseException:
            self._release()
            raise
        self._unqueue()
        return delta

    async def aclose(self) -> None:
        """Leave the counts and abort the sequence."""
        self._release()
        await self.generator.aclose()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        self._release()


class Gate:
    """The checks of admission and the counts of the bounded queue (sequences in flight, queued prompt tokens)."""

    def __init__(self, engine: AsyncEngine, served: ServedModel, config: ServerConfig):
        self.engine, self.served, self.config = engine, served, config
        self.metrics: ServeMetrics = engine.metrics
        self.max_requests = engine.max_num_seqs + config.max_waiting_requests
        self.max_tokens = config.max_waiting_tokens
        self.in_flight = 0
        self.queued_tokens = 0
        self._authorization = None if config.api_key is None else f"Bearer {config.api_key}".encode()

    def reject(self, status: int, reason: str, message: str, **kwargs: Any) -> ApiError:
        """An error for the client, counted under `reason` in the rejection metric."""
        self.metrics.requests_rejected.labels(reason).inc()
        return ApiError(status, message, **kwargs)

    def authorize(self, request: Request) -> None:
        """401 unless the request carries the key; compared in constant time, so timing does not reveal it."""
        if self._authorization is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._authorization):
            raise self.reject(401, "unauthorized", "invalid or missing API key (expected 'Authorization: Bearer "
                              "KEY')", code="invalid_api_key")

    async def read_body(self, request: Request) -> dict[str, Any]:
        """The authorized request's JSON object, read no further than the body limit."""
        self.authorize(request)
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self.reject(413, "body_too_large", f"request body over {limit} bytes", code="request_too_large")
        body = b""
        async for chunk in request.stream():  # bounded even when the client sends no content-length
            body += chunk
            if len(body) > limit:
                raise self.reject(413, "body_too_large", f"request body over {limit} bytes",
                                  code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self.reject(400, "invalid", f"request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise self.reject(400, "invalid", "request body must be a JSON object")
        return data

    async def admit(self, request: Request, model_type: type[ParsedRequest]) -> ParsedRequest:
        """Read, parse and check a request, and check that its sequences fit the queue."""
        try:
            parsed = model_type.model_validate(await self.read_body(request))
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            raise self.reject(400, "invalid", f"{param}: {first['msg']}", param=param) from None
        served = self.served
        if parsed.model is not None and parsed.model != served.name:
            raise ApiError(404, f"model {parsed.model!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        self._check_fields(parsed)
        if not self.engine.is_running:  # a dead engine process: fail now, not at the request timeout
            raise self.reject(503, "engine_stopped", "the model engine is not running (see /health); restart the "
                              "server", type_="server_error", code="engine_stopped")
        # Every prompt runs n sequences: a request is admitted for all of them or for none.
        if self.in_flight + parsed.num_prompts() * parsed.n > self.max_requests:
            raise self.reject(503, "queue_full_requests", "the server is at capacity; retry later",
                              type_="server_error", code="queue_full",
                              headers={"Retry-After": str(self.config.retry_after_s)})
        return parsed

    def _check_fields(self, parsed: CommonRequest) -> None:
        """What the models cannot check alone: sampling fields this server lacks, and ids against the vocabulary."""
        for name, value in (parsed.model_extra or {}).items():
            if name in UNSUPPORTED_SAMPLING_FIELDS and value not in UNSUPPORTED_SAMPLING_FIELDS[name]:
                raise self.reject(400, "unsupported", f"{name}: not supported by this server, which would otherwise "
                                  "sample differently than asked; leave it out", param=name,
                                  code="unsupported_parameter")
        if isinstance(parsed, ChatRequest) and parsed.top_logprobs is not None and not parsed.logprobs:
            raise self.reject(400, "invalid", "top_logprobs: needs logprobs = true", param="top_logprobs")
        vocab_size = self.served.model.spec.vocab_size
        for param, ids in (("logit_bias", [int(key) for key in parsed.logit_bias or {}]),
                           ("stop_token_ids", parsed.stop_token_ids or [])):
            if any(not 0 <= token < vocab_size for token in ids):
                raise self.reject(400, "invalid", f"{param}: token ids must lie in the vocabulary "
                                  f"(0..{vocab_size - 1})", param=param)

    def admit_tokens(self, prompts: list[list[int]], n: int) -> None:
        """503 unless the prompts' tokens, n times over, fit the queue's token bound."""
        tokens = sum(len(prompt) for prompt in prompts) * n
        if self.queued_tokens + tokens > self.max_tokens:
            raise self.reject(503, "queue_full_tokens", "the server's queue holds too many prompt tokens; retry "
                              "later", type_="server_error", code="queue_full",
                              headers={"Retry-After": str(self.config.retry_after_s)})

    def track(self, generator: AsyncIterator[Delta], prompt_tokens: int) -> Tracked:
        """Count a sequence in the queue until it ends."""
        return Tracked(self, generator, prompt_tokens)
