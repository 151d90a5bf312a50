"""Drives the synchronous engine from a background thread and streams each request's text to asyncio.

The engine thread owns the engine: adds and aborts reach it through an inbox it drains before every step, and
its outputs come back to the event loop in one callback per step. On the event loop, each request turns token
ids into text incrementally (holding back incomplete UTF-8 and possible beginnings of a stop string), applies
stop strings, and records latency metrics. A consumer that stops early (client gone, timeout, stop string)
aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenizers import Tokenizer

from aiinfra.data.tokenizer import decode
from aiinfra.serve.engine import EngineStats, LLMEngine, RequestOutput
from aiinfra.serve.metrics import ServeMetrics
from aiinfra.serve.request import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine failed during a step; in-flight requests get this error."""


@dataclass
class Delta:
    """New text of one request since its previous delta."""

    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


class Detokenizer:
    """Incremental text of a growing list of token ids, cut at the first stop string.

    Each step decodes only a short window (vLLM's prefix/read offsets), so text costs O(1) per token; a window
    whose text ends in U+FFFD is held back, as it is usually a character whose remaining bytes come next.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.emitted = 0

    def add(self, new_token_ids: list[int], final: bool) -> tuple[str, bool]:
        """Text to emit now, and whether a stop string ended the request."""
        self.token_ids += new_token_ids
        prefix_text = decode(self.tokenizer, self.token_ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokenizer, self.token_ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        text = self.text
        if self.stop:
            search_from = max(0, self.emitted - self.holdback)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out, self.emitted = text[self.emitted : end], end
                return out, True
        # Hold back what could be the beginning of a stop string until the next tokens settle it.
        end = len(text) if final else max(self.emitted, len(text) - self.holdback)
        out, self.emitted = text[self.emitted : end], end
        return out, False


class AsyncEngine:
    """The engine on its own thread, with an async `generate` per request."""

    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, metrics: ServeMetrics | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics or ServeMetrics()
        self.stats = EngineStats(num_blocks=engine.num_blocks)
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="aiinfra-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread after its current step."""
        with self._lock:
            self._stopping = True
            self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _post(self, command: tuple) -> None:
        with self._lock:
            self._inbox.append(command)
            self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                commands, self._inbox = self._inbox, []
                if self._stopping:
                    return
                idle = not commands and not engine.has_unfinished()
                if idle:
                    self._wake.clear()
            if idle:
                self._wake.wait()
                continue
            errors: list[tuple[str, Exception]] = []
            for kind, request_id, *rest in commands:
                if kind == "add":
                    try:
                        engine.add_request(request_id, *rest)
                    except ValueError as error:
                        errors.append((request_id, error))
                else:
                    engine.abort_request(request_id)
            outputs: list[RequestOutput] = []
            failure: Exception | None = None
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as error:  # a failed step must not hang every waiting client
                    failure = EngineDeadError(f"engine step failed: {error!r}")
                    for request_id in list(engine.scheduler.requests):
                        engine.abort_request(request_id)
            stats = engine.stats()
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch, outputs, errors, failure, stats)

    def _dispatch(
        self, outputs: list[RequestOutput], errors: list[tuple[str, Exception]], failure: Exception | None,
        stats: EngineStats,
    ) -> None:
        self.stats = stats
        self.metrics.observe_engine(stats.num_running, stats.num_waiting, stats.kv_cache_usage, stats.num_preemptions)
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        for request_id, error in errors:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(error)
        if failure is not None:
            for queue in self._queues.values():
                queue.put_nowait(failure)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, stop: list[str] | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream a request's text; leaving the loop early (or an exception) aborts it and frees its blocks."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        arrival = arrival_time if arrival_time is not None else time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        detokenizer = Detokenizer(self.tokenizer, stop or [])
        metrics = self.metrics
        finished = recorded = False
        last_token_time: float | None = None
        self._post(("add", request_id, list(prompt_token_ids), params))
        try:
            while True:
                output = await queue.get()
                if isinstance(output, Exception):
                    finished = True  # the engine already dropped it
                    raise output
                now = time.perf_counter()
                if output.new_token_ids:
                    if last_token_time is None:
                        metrics.time_to_first_token_seconds.observe(now - arrival)
                        metrics.prompt_tokens.inc(output.num_prompt_tokens)
                        metrics.prefix_cache_hit_tokens.inc(output.num_cached_tokens)
                    else:
                        metrics.inter_token_latency_seconds.observe(now - last_token_time)
                    metrics.generation_tokens.inc(len(output.new_token_ids))
                    last_token_time = now
                text, stopped = detokenizer.add(output.new_token_ids, output.finished)
                reason = "stop" if stopped else output.finish_reason
                done = stopped or output.finished
                finished = output.finished
                if text or done:
                    yield Delta(text, reason if done else None, output.num_prompt_tokens, output.num_output_tokens,
                                output.num_cached_tokens)
                if done:
                    metrics.e2e_request_latency_seconds.observe(now - arrival)
                    metrics.requests_finished.labels(reason).inc()
                    recorded = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))
            if not recorded:
                metrics.requests_finished.labels("abort").inc()
