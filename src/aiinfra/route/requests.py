"""What the gateway reads of a client's request: its JSON body, checked, and the features the policies use."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from aiinfra.route.fleet import GatewayConfig
from aiinfra.route.policies import RouteRequest


class ClientError(Exception):
    """A client's mistake, answered with an OpenAI error envelope and a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status, message, param, code, type_, headers)

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.Response(body=orjson.dumps(body), status=self.status, content_type="application/json",
                            headers=self.headers)


async def read_json(request: web.Request, max_body_bytes: int) -> dict[str, Any]:
    """The request's JSON object, or a ClientError naming what is wrong with it."""
    try:
        body = await request.read()  # the whole body; the application's client_max_size bounds it
    except web.HTTPRequestEntityTooLarge:
        raise ClientError(413, f"request body over {max_body_bytes} bytes", code="request_too_large") from None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ClientError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ClientError(400, "request body must be a JSON object")
    return data


def prompt_key(body: dict[str, Any], chat: bool) -> str:
    """The text that decides prefix affinity: the prompt, or every message of the conversation in order."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError(400, "messages: expected a non-empty list of messages", param="messages")
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                raise ClientError(400, "messages: each message must be an object", param="messages")
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            parts.append(f"{message.get('role')}\x00{content or ''}\x01")
        return "".join(parts)
    prompt = body.get("prompt")
    if prompt is None:
        raise ClientError(400, "prompt: field required", param="prompt")
    return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def prefix_blocks(text: str, block_chars: int) -> tuple[int, ...]:
    """Hashes of the text's whole blocks, each chained over the one before (so a hash names a whole prefix)."""
    hashes, previous = [], 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return tuple(hashes)


def route_request(body: dict[str, Any], chat: bool, model: str, headers: Any, config: GatewayConfig,
                  with_prefix: bool) -> RouteRequest:
    """The policy's view of a request."""
    key = prompt_key(body, chat)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ClientError(400, "max_tokens: expected an integer >= 1", param="max_tokens")
    session = headers.get(config.session_header) or body.get("user")
    return RouteRequest(
        model=model, prefix_blocks=prefix_blocks(key, config.prefix_block_chars) if with_prefix else (),
        session=str(session) if session else None, region=headers.get("x-aiinfra-region", ""),
        prompt_chars=len(key), max_tokens=max_tokens,
    )
