"""Server-sent events through the gateway: splitting a byte stream into events, and what a stream has sent so far,
so that another backend can continue the same answer when the first one dies mid-stream.

Against an aiinfra backend the continuation is exact: the gateway asks for each chunk's token ids
(`return_token_ids`), and on failover sends the same request with `continuation` (those ids and how many characters
of their text the client already has); the new backend resumes generation after those tokens and its text where
the client's left off. Against any other server it continues from the text, as a best effort: the completion's
prompt plus the text so far, or the chat with a partial assistant message (vLLM's `continue_final_message`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = "[DONE]"


class SSEParser:
    """Complete events out of arbitrary byte chunks; each event is returned with its `data:` payload."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, str]]:
        """(raw event bytes with their blank-line terminator, data payload) for every event completed by `chunk`."""
        buffer = self.buffer + chunk if self.buffer else chunk
        if b"\r" in buffer:  # CRLF framing (rare): normalise, then parse as LF
            buffer = buffer.replace(b"\r\n", b"\n")
        parts = buffer.split(b"\n\n")
        self.buffer = parts.pop()  # what follows the last blank line: an incomplete event
        events = []
        for part in parts:
            raw = part + b"\n\n"
            if part.startswith(b"data: ") and b"\n" not in part:  # the usual one-line event
                events.append((raw, part[6:].decode("utf-8", "replace")))
                continue
            data = [line[5:].lstrip() for line in part.decode("utf-8", "replace").split("\n")
                    if line.startswith("data:")]
            if data:
                events.append((raw, "\n".join(data)))
        return events


def sse(payload: dict[str, Any] | str) -> bytes:
    """One event in the OpenAI framing."""
    body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + body + b"\n\n"


def chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    """The text one choice of a chunk adds."""
    choice = chunk["choices"][0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


@dataclass
class StreamState:
    """What the client has received of one streamed answer (one choice: continuation is for n = 1).

    The relay only records each event's data as it passes (`sent`); they are parsed once, by `summarise`, when a
    backend fails mid-stream, so that a healthy stream costs no JSON work per token.
    """

    chat: bool
    sent: list[str] = field(default_factory=list)  # every event's data as a backend gave it (token ids included)
    id: str | None = None
    created: int | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0  # chunks with text: the token count where the server gives no ids
    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)  # the text as it was chunked, for the cache's replay
    usage: dict[str, Any] | None = None
    model: str | None = None

    def summarise(self) -> None:
        """Parse what was sent into the text, token ids and finish reason a continuation (or the cache) needs."""
        self.id = self.created = self.finish_reason = self.usage = self.model = None
        self.text, self.token_ids, self.chunks, self.pieces = "", [], 0, []
        for data in self.sent:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self.observe(chunk)

    def observe(self, chunk: dict[str, Any]) -> None:
        """Add one chunk the client was sent to the summary."""
        if self.id is None:
            self.id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            text = chunk_text({"choices": [choice]}, self.chat)
            if text:
                self.text += text
                self.chunks += 1
                self.pieces.append(text)
            self.token_ids += choice.get("token_ids") or ()
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def rewrite(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """A continuation's chunk as part of the first stream (its id and time), or None to drop it: the chat
        role announcement the client already had."""
        choices = chunk.get("choices") or []
        if self.chat and choices and not chunk_text(chunk, True) and choices[0].get("finish_reason") is None:
            return None
        if self.id is not None:
            chunk["id"], chunk["created"] = self.id, self.created
        return chunk

    def continuation(self, body: dict[str, Any], exact: bool) -> dict[str, Any] | None:
        """The request that continues this answer on another backend, or None where none can."""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if body.get("n", 1) != 1 or self.finish_reason is not None:
            return None
        if exact:
            if not self.token_ids:
                return dict(body)  # nothing was generated that the client saw: start again
            if max_tokens is not None and len(self.token_ids) >= max_tokens:
                return None
            return body | {"return_token_ids": True,
                           "continuation": {"output_token_ids": self.token_ids, "emitted_chars": len(self.text)}}
        remaining = {} if max_tokens is None else {"max_tokens": max_tokens - self.chunks}
        if max_tokens is not None and max_tokens - self.chunks < 1:
            return None
        body = {key: value for key, value in body.items() if key not in ("max_completion_tokens", "return_token_ids")}
        if self.chat:
            messages = [*body["messages"], {"role": "assistant", "content": self.text}]
            return body | remaining | {"messages": messages, "continue_final_message": True,
                                       "add_generation_prompt": False}
        if not isinstance(body.get("prompt"), str):
            return None  # token-id prompts cannot be extended with text without the backend's tokenizer
        return body | remaining | {"prompt": body["prompt"] + self.text}


def strip_token_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    """Drop the ids the gateway asked for on the client's behalf."""
    for choice in chunk.get("choices") or ():
        choice.pop("token_ids", None)
    return chunk


_IDS_AFTER = re.compile(rb',\s*"token_ids"\s*:\s*\[[^\]]*\]')
_IDS_BEFORE = re.compile(rb'"token_ids"\s*:\s*\[[^\]]*\]\s*,\s*')


def strip_token_ids_raw(raw: bytes) -> bytes:
    """`strip_token_ids` on an event's bytes, without parsing them (a list of ints holds no bracket or quote)."""
    if b'"token_ids"' not in raw:
        return raw
    return _IDS_BEFORE.sub(b"", _IDS_AFTER.sub(b"", raw))


def is_error_event(data: str) -> bool:
    """An error envelope sent in place of a chunk (a server that gave up mid-stream)."""
    if '"error"' not in data or '"choices"' in data:
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and "error" in chunk


def error_event(message: str, code: str) -> bytes:
    """An OpenAI error envelope as one SSE event."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
