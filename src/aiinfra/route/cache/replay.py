"""Answers as the cache keeps them, and back: a backend's JSON answer or completed stream becomes one canonical
record (each choice's text in the pieces it streamed in, its finish reason, the usage), which a hit renders as a
JSON answer or as an SSE stream in the OpenAI framing, whichever the new request asks for."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from aiinfra.route.stream import DONE, StreamState, sse


def from_json(payload: bytes, chat: bool) -> bytes | None:
    """The record of a non-streamed answer, or None when it must not be cached (an unfinished choice, tools)."""
    try:
        data = orjson.loads(payload)
        choices = []
        for choice in sorted(data["choices"], key=lambda c: c.get("index", 0)):
            if choice.get("finish_reason") in (None, "error", "abort"):
                return None
            if chat:
                message = choice["message"]
                if message.get("tool_calls") or not isinstance(message.get("content"), str):
                    return None
                text = message["content"]
            else:
                text = choice["text"]
            choices.append({"pieces": [text], "finish_reason": choice["finish_reason"]})
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not choices:
        return None
    return orjson.dumps({"chat": chat, "model": data.get("model"), "choices": choices, "usage": data.get("usage")})


def from_stream(state: StreamState) -> bytes | None:
    """The record of a stream that finished (one choice; streams with n > 1 are not cached)."""
    if state.finish_reason in (None, "error", "abort"):
        return None
    return orjson.dumps({"chat": state.chat, "model": state.model, "usage": state.usage,
                         "choices": [{"pieces": state.pieces, "finish_reason": state.finish_reason}]})


def _usage(record: dict[str, Any]) -> dict[str, Any] | None:
    usage = record.get("usage")
    return usage if isinstance(usage, dict) else None


def tokens(record: dict[str, Any]) -> int:
    """The backend tokens a hit saves: the prompt's and the answer's."""
    usage = _usage(record) or {}
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def render_json(record: dict[str, Any]) -> bytes:
    """The record as a non-streamed answer."""
    chat = record["chat"]
    choices = []
    for index, choice in enumerate(record["choices"]):
        text = "".join(choice["pieces"])
        body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        choices.append({"index": index, **body, "finish_reason": choice["finish_reason"]})
    answer = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
              "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
              "model": record.get("model"), "choices": choices}
    if _usage(record) is not None:
        answer["usage"] = record["usage"]
    return orjson.dumps(answer)


def render_stream(record: dict[str, Any]) -> bytes:
    """The record as a whole SSE body: the pieces as chunks, the finish, the usage, then [DONE]."""
    chat = record["chat"]
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": record.get("model")}
    choice = record["choices"][0]
    events = []
    if chat:
        events.append(sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]}))
    for piece in choice["pieces"]:
        body = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
        events.append(sse(head | {"choices": [{"index": 0, **body, "finish_reason": None}]}))
    last = {"delta": {}} if chat else {"text": "", "logprobs": None}
    events.append(sse(head | {"choices": [{"index": 0, **last, "finish_reason": choice["finish_reason"]}]}))
    if _usage(record) is not None:
        events.append(sse(head | {"choices": [], "usage": record["usage"]}))
    events.append(sse(DONE))
    return b"".join(events)
