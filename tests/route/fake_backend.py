"""A scriptable OpenAI-compatible server (not ours) on a thread of its own, for the gateway's failure paths: answer
words after a delay, fail with a status and Retry-After, cut a stream after some chunks, or stall; and, for the
cascade, logprobs (of its words, and of an echoed prompt) at a probability the test chooses per prompt."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Behaviour:
    """What the server does with the next requests; tests change it while it runs."""

    words: int = 8
    first_delay_s: float = 0.0
    status: int = 200
    retry_after: str | None = None
    cut_after: int | None = None  # chunks sent before the connection is dropped
    models_owner: str = "someone-else"
    word: str = "w"  # the answer is "w0 w1 ...": another letter tells two pools' answers apart
    probability: Callable[[str], float] = lambda text: 0.5  # every token's probability, from the prompt's text


@dataclass
class FakeBackend:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict] = field(default_factory=list)
    cancelled: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def words_for(self, body: dict) -> list[str]:
        """The answer "w0 w1 ... ": a request whose text already holds k of those words (a continuation from
        text) gets the words from k on, so a continued answer equals the uncut one."""
        text = self.text_of(body)
        word = self.behaviour.word
        done = len(re.findall(rf"{word}\d+ ", text))
        count = min(self.behaviour.words - done, body.get("max_tokens") or 16)
        return [f"{word}{done + i} " for i in range(max(count, 0))]

    @staticmethod
    def text_of(body: dict) -> str:
        return str(body.get("prompt")) if "prompt" in body else json.dumps(body.get("messages"))

    def logprobs(self, body: dict, chat: bool, words: list[str]) -> dict | None:
        """OpenAI's logprobs block for the answer (and for the echoed prompt's words), or None if not asked."""
        logprob = math.log(self.behaviour.probability(self.text_of(body)))
        if chat:
            if not body.get("logprobs"):
                return None
            return {"content": [{"token": word, "logprob": logprob, "bytes": None, "top_logprobs": []}
                                for word in words]}
        if body.get("logprobs") is None:
            return None
        tokens = [*(re.findall(r"\S+\s*", str(body["prompt"])) if body.get("echo") else []), *words]
        values = [None if i == 0 and body.get("echo") else logprob for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": [None] * len(tokens),
                "text_offset": [0] * len(tokens)}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        behaviour = self.behaviour
        try:
            await asyncio.sleep(behaviour.first_delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if behaviour.status != 200:
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else None
            return web.json_response({"error": {"message": "nope", "type": "server_error", "param": None,
                                                "code": None}}, status=behaviour.status, headers=headers)
        chat = request.path.endswith("chat/completions")
        words = self.words_for(body)
        if not body.get("stream"):
            text = ("".join(re.findall(r"\S+\s*", str(body["prompt"]))) if body.get("echo") else "") + "".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else
                      {"index": 0, "text": text}) | {"finish_reason": "length",
                                                     "logprobs": self.logprobs(body, chat, words)}
            return web.json_response({"id": "fake", "object": "x", "created": 1, "model": body.get("model"),
                                      "choices": [choice], "usage": {"prompt_tokens": 1,
                                                                     "completion_tokens": len(words)}})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index, word in enumerate(words):
            if behaviour.cut_after is not None and index >= behaviour.cut_after:
                assert request.transport is not None
                request.transport.abort()  # as a killed server: no [DONE], the connection reset
                return response
            finish = "length" if index == len(words) - 1 else None
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            chunk = {"id": "fake", "object": "x", "created": 1, "choices": [choice | {"finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.001)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "owned_by": self.behaviour.models_owner}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def start(self) -> FakeBackend:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self.runner = web.AppRunner(app, handler_cancellation=True)
            await self.runner.setup()
            await web.SockSite(self.runner, sock).start()
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        time.sleep(0)
