"""The cascade on the request path: a request for a cascade's virtual model goes to its small pool or its large one.

- `generate` mode: the small pool answers (non-streamed, with logprobs); its answer stands if its confidence clears
  the threshold, else the request goes to the large pool. A streamed request is answered after the decision: the
  small answer replayed as SSE, or the large pool's stream relayed (so its time to first token includes the small
  model's whole answer; bench/cascade.py measures it).
- `prompt` mode: one prefill-only request to the small pool scores the prompt (completions with `echo` and
  `logprobs`, one generated token), and the request then goes to exactly one pool.

Every response says what happened in `x-aiinfra-cascade` (small or large), `x-aiinfra-cascade-model` (that pool's
model), `x-aiinfra-cascade-score`, `x-aiinfra-cascade-threshold` and `x-aiinfra-cascade-reason` (`confident`,
`unconfident`, `small_unavailable`: the small pool could not answer or score, `no_logprobs`: its answer carried
none, `small_rejected`: it refused the request as the client's mistake, passed on).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from aiinfra.route.backend_client import AttemptFailed
from aiinfra.route.cascade import answer_logprobs, decide, prompt_logprobs, score_runs
from aiinfra.route.fleet import CascadeConfig
from aiinfra.route.gateway import Gateway, NoBackend, Tried
from aiinfra.route.relay import answer
from aiinfra.route.requests import route_request
from aiinfra.route.stream import DONE, sse

CASCADE_HEADER = "x-aiinfra-cascade"
MODEL_HEADER = "x-aiinfra-cascade-model"
SCORE_HEADER = "x-aiinfra-cascade-score"
THRESHOLD_HEADER = "x-aiinfra-cascade-threshold"
REASON_HEADER = "x-aiinfra-cascade-reason"

Forward = Callable[[web.Request, str, dict[str, Any], dict[str, str]], Awaitable[web.StreamResponse]]


def _headers(config: CascadeConfig, pool: str, score: float | None, reason: str) -> dict[str, str]:
    headers = {CASCADE_HEADER: pool, MODEL_HEADER: config.small if pool == "small" else config.large,
               THRESHOLD_HEADER: f"{config.threshold:.6g}", REASON_HEADER: reason}
    if score is not None:
        headers[SCORE_HEADER] = f"{score:.6f}"
    return headers


def client_wants_logprobs(body: dict[str, Any], chat: bool) -> bool:
    """Whether the client itself asked for logprobs (else the gateway's are cut from the answer)."""
    return bool(body.get("logprobs")) if chat else body.get("logprobs") is not None


def small_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The generate mode's request to the small pool: not streamed, with the chosen tokens' logprobs."""
    small = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    if not client_wants_logprobs(body, chat):
        small |= {"logprobs": True, "top_logprobs": 0} if chat else {"logprobs": 0}
    return small


def scoring_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The prompt mode's prefill-only request: the prompt echoed with its logprobs and one generated token. A chat
    is scored as its messages' text, one per line (no chat template: the gateway has no tokenizer)."""
    if chat:
        prompt: Any = "\n".join(_content(message) for message in body.get("messages") or [])
    else:
        prompt = body.get("prompt")
    return {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0.0}


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def strip_logprobs(payload: dict[str, Any]) -> dict[str, Any]:
    """The answer without the logprobs the gateway asked for on the client's behalf."""
    for choice in payload.get("choices") or ():
        choice["logprobs"] = None
    return payload


def replay_stream(payload: dict[str, Any], chat: bool, logprobs: bool, usage: bool) -> bytes:
    """A non-streamed answer as the SSE body a streamed request would have had: a chunk per token where the
    logprobs name the tokens (else one chunk of text), each choice's finish, the usage if asked, then [DONE]."""
    head = {"id": payload.get("id") or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": payload.get("created") or int(time.time()), "model": payload.get("model")}
    events = []
    for choice in sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0)):
        index = choice.get("index", 0)
        if chat:
            events.append(sse(head | {"choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]}))
        for text, block in _pieces(choice, chat):
            body = {"delta": {"content": text}} if chat else {"text": text}
            events.append(sse(head | {"choices": [{"index": index, **body, "logprobs": block if logprobs else None,
                                                   "finish_reason": None}]}))
        last = {"delta": {}} if chat else {"text": ""}
        events.append(sse(head | {"choices": [{"index": index, **last, "logprobs": None,
                                               "finish_reason": choice.get("finish_reason")}]}))
    if usage and payload.get("usage") is not None:
        events.append(sse(head | {"choices": [], "usage": payload["usage"]}))
    events.append(sse(DONE))
    return b"".join(events)


def _pieces(choice: dict[str, Any], chat: bool) -> list[tuple[str, Any]]:
    """(text, logprobs block) per streamed chunk of one choice."""
    block = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else None
    if chat:
        text = (choice.get("message") or {}).get("content") or ""
        entries = (block or {}).get("content") or []
        if entries and "".join(entry.get("token", "") for entry in entries) == text:
            return [(entry["token"], {"content": [entry]}) for entry in entries]
        return [(text, block)] if text else []
    text = choice.get("text") or ""
    tokens = (block or {}).get("tokens") or []
    if tokens and "".join(tokens) == text:
        keys = [key for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset") if key in block]
        return [(token, {key: [block[key][i]] for key in keys}) for i, token in enumerate(tokens)]
    return [(text, block)] if text else []


async def _ask_small(gateway: Gateway, config: CascadeConfig, request: web.Request, path: str,
                     body: dict[str, Any], route_body: dict[str, Any], chat: bool) -> Any:
    """The small pool's non-streamed answer (an Attempt), or None when no backend of it could answer."""
    route = route_request(route_body, chat, config.small, request.headers, gateway.config,
                          gateway.policy.uses_prefix)
    gateway.in_flight += 1
    try:
        return await gateway.open(config.small, route, path, lambda _: body, False,
                                  Tried(set(), gateway.config.max_retries))
    except (NoBackend, AttemptFailed):
        return None
    finally:
        gateway.in_flight -= 1


def _count(gateway: Gateway, config: CascadeConfig, pool: str, reason: str, score: float | None) -> None:
    metrics = gateway.metrics
    metrics.child(metrics.cascade_decisions, config.model, pool, reason).inc()
    if score is not None:
        metrics.child(metrics.cascade_score, config.model).observe(score)


async def cascade(request: web.Request, gateway: Gateway, config: CascadeConfig, body: dict[str, Any], path: str,
                  forward: Forward) -> web.StreamResponse:
    """Answer a request for the cascade's virtual model; `forward(request, model, body, headers)` sends a request
    to one pool as the gateway sends any other (retries, failover, the semantic cache)."""
    chat = path.endswith("chat/completions")
    if config.mode == "prompt":
        return await _prompt_mode(request, gateway, config, body, chat, forward)
    return await _generate_mode(request, gateway, config, body, path, chat, forward)


async def _prompt_mode(request: web.Request, gateway: Gateway, config: CascadeConfig, body: dict[str, Any],
                       chat: bool, forward: Forward) -> web.StreamResponse:
    scoring = scoring_body(body, chat)
    attempt = await _ask_small(gateway, config, request, "/v1/completions", scoring, body, chat)
    score, reason = None, "small_unavailable"
    if attempt is not None:
        status = attempt.status
        attempt.close(str(status))
        if status == 200:
            try:
                score = score_runs(prompt_logprobs(orjson.loads(attempt.payload)), config.statistic, config.quantile,
                                   config.learned_router(), config.feature_prefix)
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                reason = "no_logprobs"
    pool = decide(score, config.threshold)
    if score is not None:
        reason = "confident" if pool == "small" else "unconfident"
    _count(gateway, config, pool, reason, score)
    model = config.small if pool == "small" else config.large
    return await forward(request, model, body, _headers(config, pool, score, reason))


async def _generate_mode(request: web.Request, gateway: Gateway, config: CascadeConfig, body: dict[str, Any],
                         path: str, chat: bool, forward: Forward) -> web.StreamResponse:
    attempt = await _ask_small(gateway, config, request, path, small_body(body, chat), body, chat)
    if attempt is None:
        _count(gateway, config, "large", "small_unavailable", None)
        return await forward(request, config.large, body, _headers(config, "large", None, "small_unavailable"))
    if attempt.status != 200:  # the small pool refused the request itself (a 4xx): the client's to see
        _count(gateway, config, "small", "small_rejected", None)
        response = answer(attempt, gateway)
        response.headers.update(_headers(config, "small", None, "small_rejected"))
        return response
    payload_bytes = attempt.payload
    response = answer(attempt, gateway)  # records the success and releases the attempt
    try:
        payload = orjson.loads(payload_bytes)
        score = score_runs(answer_logprobs(payload, chat, bool(body.get("echo"))), config.statistic,
                           config.quantile, config.learned_router(), config.feature_prefix)
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        _count(gateway, config, "large", "no_logprobs", None)
        return await forward(request, config.large, body, _headers(config, "large", None, "no_logprobs"))
    if decide(score, config.threshold) == "large":
        _count(gateway, config, "large", "unconfident", score)
        return await forward(request, config.large, body, _headers(config, "large", score, "unconfident"))
    _count(gateway, config, "small", "confident", score)
    headers = _headers(config, "small", score, "confident") | {"x-aiinfra-backend": response.headers.get(
        "x-aiinfra-backend", "")}
    wants = client_wants_logprobs(body, chat)
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return web.Response(body=replay_stream(payload, chat, wants, usage), content_type="text/event-stream",
                            headers=headers | {"cache-control": "no-cache"})
    if not wants:
        payload_bytes = orjson.dumps(strip_logprobs(payload))
    return web.Response(body=payload_bytes, content_type="application/json", headers=headers)
