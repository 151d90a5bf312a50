"""Server-sent events through the gateway: splitting a byte stream into events, and what a stream has sent so far,
so that another backend can continue the same answer when the first one dies mid-stream.

Against an aiinfra backend the continuation is exact: the gateway asks for each chunk's token ids
(`return_token_ids`), and on failover sends the same request with `continuation` (those ids and how many characters
of their text the client already has); the new backend resumes generation after those tokens and its text where
the client's left off. Against any other server it continues from the text, as a best effort: the completion's
prompt plus the text so far, or the chat with a partial assistant message (vLLM's `continue_final_message`).
"""

from __future__ import annotations

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
        self.buffer += chunk
        events = []
        while True:
            end, size = self.buffer.find(b"\n\n"), 2
            crlf = self.buffer.find(b"\r\n\r\n")
            if crlf >= 0 and (end < 0 or crlf < end):
                end, size = crlf, 4
            if end < 0:
                return events
            raw, self.buffer = self.buffer[: end + size], self.buffer[end + size :]
            if raw.startswith(b"data: ") and raw.find(b"\n", 6, end) < 0:  # the usual one-line event
                events.append((raw, raw[6:end].decode("utf-8", "replace")))
                continue
            data = [line[5:].lstrip() for line in raw.decode("utf-8", "replace").splitlines()
                    if line.startswith("data:")]
            if data:
                events.append((raw, "\n".join(data)))


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
    """What the client has received of one streamed answer (one choice: continuation is for n = 1)."""

    chat: bool
    id: str | None = None
    created: int | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0  # chunks with text: the token count where the server gives no ids
    finish_reason: str | None = None
    usage_sent: bool = False
    pieces: list[str] = field(default_factory=list)  # the text as it was chunked, for the cache's replay
    usage: dict[str, Any] | None = None
    model: str | None = None

    def observe(self, chunk: dict[str, Any]) -> None:
        """Record a chunk the client was sent."""
        if self.id is None:
            self.id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            self.usage_sent = self.usage_sent or not chunk.get("choices")
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


def error_event(message: str, code: str) -> bytes:
    """An OpenAI error envelope as one SSE event."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
