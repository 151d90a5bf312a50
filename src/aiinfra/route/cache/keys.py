"""Which requests the cache serves, and where an entry applies: its partition (model, endpoint, sampling
parameters, the whole conversation before the last message with its exact system prompt, and the tenant when
configured) and the text that is embedded (the last user message, or the prompt)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from aiinfra.route.fleet import CacheConfig

NOT_SAMPLING = frozenset({"model", "messages", "prompt", "stream", "stream_options", "user"})
UNCACHEABLE = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "echo", "continuation")


def entry_id(partition: str, text: str) -> str:
    """An entry's key: the same question in the same partition is one entry."""
    return hashlib.sha256(f"{partition}\x00{text}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """A request the cache looks up (unless `Cache-Control: no-cache`) and stores (unless `no-store`)."""

    partition: str
    text: str
    lookup: bool
    store: bool

    @property
    def key(self) -> str:
        return entry_id(self.partition, self.text)


def _content(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(parts) if len(parts) == len(content) else None
    return content if isinstance(content, str) else None


def plan(body: dict[str, Any], chat: bool, model: str, headers: Any, config: CacheConfig,
         tenant: str | None) -> Plan | str:
    """The request's plan, or why it bypasses the cache."""
    control = headers.get("cache-control", "").lower()
    lookup, store = "no-cache" not in control, "no-store" not in control
    if not (lookup or store):
        return "cache-control"
    temperature = body.get("temperature", 1.0)
    opted_in = headers.get("x-aiinfra-cache", "").lower() == "use"
    if temperature != 0 and not (config.all_temperatures or opted_in):
        return "temperature"
    if any(body.get(name) for name in UNCACHEABLE) or (body.get("stream") and body.get("n", 1) != 1):
        return "unsupported"
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or \
                messages[-1].get("role") != "user":
            return "unsupported"
        text, history = _content(messages[-1]), messages[:-1]
    else:
        text, history = body.get("prompt"), None
    if not isinstance(text, str) or not text.strip():
        return "unsupported"
    scope = {"chat": chat, "model": model, "history": history, "tenant": tenant,
             "sampling": {key: value for key, value in body.items() if key not in NOT_SAMPLING}}
    try:
        partition = hashlib.sha256(orjson.dumps(scope, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    except TypeError:
        return "unsupported"
    return Plan(partition, text, lookup, store)
