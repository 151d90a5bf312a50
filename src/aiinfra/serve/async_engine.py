"""Streams each request's text to asyncio from an engine core that runs the synchronous engine elsewhere.

The core (a thread, or a process of its own: `serve.engine_core`) owns the engine: adds and aborts reach it as
commands it drains before every step, and its outputs come back to the event loop in one callback per step. On the
event loop, each request turns token ids into text incrementally (holding back incomplete UTF-8 and possible
beginnings of a stop string), applies stop strings, and records latency metrics. A consumer that stops early
(client gone, timeout, stop string) aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenizers import Tokenizer

from aiinfra.data.tokenizer import decode
from aiinfra.observe.serve_metrics import ServeMetrics
from aiinfra.serve.engine import EngineStats, LLMEngine
from aiinfra.serve.engine_core import EngineCore, EngineDeadError, StepResult, ThreadEngineCore
from aiinfra.serve.request import SamplingParams, TokenLogprobs


class RequestRefusedError(ValueError):
    """The engine refused to add the request (its message says why)."""


@dataclass
class Delta:
    """New text of one request since its previous delta, and the token ids generated since then.

    A delta's token ids may be ahead of its text (text held back for a stop string or an incomplete character):
    the ids and the emitted text together are what a continuation on another server resumes from.
    """

    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    """aligned with token_ids, when the request asked for logprobs"""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """in the request's first delta, when it asked for them"""


class Detokenizer:
    """Incremental text of a growing list of token ids, cut at the first stop string.

    Each step decodes only a short window (vLLM's prefix/read offsets), so text costs O(1) per token; a window
    whose text ends in U+FFFD is held back, as it is usually a character whose remaining bytes come next. Only the
    text not yet emitted is kept (at most the longest stop string less one character, plus the new text): emitted
    text can hold no unfound stop string, since whatever could begin one was held back until it was settled.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.pending = ""

    def _decode_new(self, new_token_ids: list[int], final: bool) -> None:
        self.token_ids += new_token_ids
        prefix_text = decode(self.tokenizer, self.token_ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokenizer, self.token_ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.pending += new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)

    def resume(self, token_ids: list[int], emitted_chars: int) -> None:
        """Take over an answer whose `token_ids` were generated and whose first `emitted_chars` were sent elsewhere."""
        self._decode_new(list(token_ids), final=False)
        self.pending = self.pending[min(emitted_chars, len(self.pending)) :]

    def add(self, new_token_ids: list[int], final: bool) -> tuple[str, bool]:
        """Text to emit now, and whether a stop string ended the request."""
        self._decode_new(new_token_ids, final)
        pending = self.pending
        if self.stop:
            hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.pending = ""
                return pending[: min(hits)], True
        # Hold back what could be the beginning of a stop string until the next tokens settle it.
        end = len(pending) if final else max(0, len(pending) - self.holdback)
        self.pending = pending[end:]
        return pending[:end], False


class AsyncEngine:
    """An engine core (a thread or a process, see `serve.engine_core`) with an async `generate` per request."""

    def __init__(self, core: EngineCore | LLMEngine, tokenizer: Tokenizer, metrics: ServeMetrics | None = None):
        self.core = ThreadEngineCore(core) if isinstance(core, LLMEngine) else core
        self.tokenizer = tokenizer
        self.metrics = metrics or ServeMetrics()
        self.stats = EngineStats(num_blocks=self.core.num_blocks)
        self._queues: dict[str, asyncio.Queue] = {}

    @property
    def is_running(self) -> bool:
        return self.core.is_alive

    @property
    def max_seq_len(self) -> int:
        return self.core.max_seq_len

    @property
    def max_num_seqs(self) -> int:
        return self.core.max_num_seqs

    def start(self) -> None:
        """Start the engine core; call from the event loop that will consume the outputs."""
        self.core.start(asyncio.get_running_loop(), self._dispatch)

    def stop(self) -> None:
        """Stop the engine core after its current step."""
        self.core.stop()

    def _post(self, command: tuple) -> None:
        self.core.post(command)

    def _dispatch(self, result: StepResult) -> None:
        """On the event loop: hand one step's outputs, per-request errors and a failure to the waiting requests."""
        stats = self.stats = result.stats
        self.metrics.observe_engine(stats.num_running, stats.num_waiting, stats.kv_cache_usage, stats.num_preemptions)
        for output in result.outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        for request_id, message in result.errors:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(RequestRefusedError(message))
        if result.failure is not None:
            failed = self._queues.keys() if result.failed_ids is None else result.failed_ids
            for request_id in list(failed):
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(EngineDeadError(result.failure))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, stop: list[str] | None = None,
        arrival_time: float | None = None, resume: tuple[list[int], int] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream a request's text; leaving the loop early (or an exception) aborts it and frees its blocks.

        `resume` = (output token ids generated elsewhere, characters of their text already sent): the request
        continues an answer another server began. The caller puts those ids at the end of the prompt and lowers
        max_tokens by their count; text and token counts continue exactly where the first server's left off.
        """
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        arrival = arrival_time if arrival_time is not None else time.perf_counter()
        if not self.core.is_alive:  # checked on the event loop, which is where a death is noticed: no race
            raise EngineDeadError("the model engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        detokenizer = Detokenizer(self.tokenizer, stop or [])
        prior_tokens = 0
        if resume is not None:
            prior_ids, emitted_chars = resume
            detokenizer.resume(prior_ids, emitted_chars)
            prior_tokens = len(prior_ids)
        pending_ids: list[int] = []
        pending_logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        prompt_logprobs: list[TokenLogprobs | None] | None = None
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
                pending_ids += output.new_token_ids
                if pending_logprobs is not None and output.logprobs:
                    pending_logprobs += output.logprobs
                if output.prompt_logprobs is not None:
                    prompt_logprobs = output.prompt_logprobs
                reason = "stop" if stopped else output.finish_reason
                done = stopped or output.finished
                finished = output.finished
                if text or done:
                    yield Delta(text, reason if done else None, output.num_prompt_tokens - prior_tokens,
                                output.num_output_tokens + prior_tokens, output.num_cached_tokens, pending_ids,
                                pending_logprobs, prompt_logprobs)
                    pending_ids, prompt_logprobs = [], None
                    pending_logprobs = [] if pending_logprobs is not None else None
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
