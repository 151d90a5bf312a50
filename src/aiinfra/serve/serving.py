"""What completions and chat share: admitted prompts become engine sequences (`n` per prompt), and their deltas
become a response, a stream of server-sent events or one JSON body. The endpoint families
(`serving_completion`, `serving_chat`) say how a choice looks; everything else is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from tokenizers import Tokenizer

from aiinfra.data.tokenizer import decode
from aiinfra.serve.admission import Gate
from aiinfra.serve.async_engine import AsyncEngine, Delta
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.protocol import ApiError, CommonRequest, failure_of
from aiinfra.serve.request import SamplingParams, TokenLogprobs

MIN_LOGPROB = -9999.0  # vLLM's floor for a logprob that underflowed: JSON has no -Infinity


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """`asyncio.timeout` (Python 3.11+) for 3.10 too: cancel the current task after `seconds`, as TimeoutError."""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):  # 3.11+: this cancellation is handled, not pending on the task
            task.uncancel()
        raise TimeoutError from None
    finally:
        handle.cancel()


async def merged(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave the deltas of several choices; closing this cancels them all (which aborts them)."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TokenTexts:
    """The text of single tokens, as logprobs show them (cached: a vocabulary is finite)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = decode(self.tokenizer, [token_id])
        return text


def clamp(logprob: float) -> float:
    """A logprob JSON can carry."""
    return max(logprob, MIN_LOGPROB)


@dataclass
class ChoiceState:
    """One choice of a response as its deltas arrive."""

    index: int
    prompt_index: int
    text_offset: int = 0  # characters of this choice's text before the next token (completions' text_offset)
    started: bool = False
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprobs | None]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        """Accumulate a delta (for a response sent whole)."""
        self.texts.append(delta.text)
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs += zip(delta.token_ids, delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


@dataclass
class Generation:
    """One admitted request on its way through the engine."""

    request_id: str
    created: int
    parsed: CommonRequest
    prompts: list[list[int]]
    echo_texts: list[str]
    choices: list[ChoiceState]

    def usage(self) -> dict[str, int]:
        """OpenAI's usage block: prompt tokens once per prompt, completion tokens over every choice."""
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        completion_tokens = sum(choice.completion_tokens for choice in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class OpenAIServing:
    """The shared path of one endpoint family; subclasses say how choices look (`stream_choices`, `final_choice`)."""

    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, engine: AsyncEngine, served: ServedModel, gate: Gate):
        self.engine, self.served, self.gate = engine, served, gate
        self.config = gate.config
        self.token_text = TokenTexts(served.tokenizer)

    def preamble(self, generation: Generation) -> list[dict[str, Any]]:
        """Choices of a stream's first chunk, before any token (chat: the role)."""
        return []

    def stream_choices(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[dict[str, Any]]:
        """The choices a delta becomes in a stream, one chunk each."""
        raise NotImplementedError

    def final_choice(self, generation: Generation, choice: ChoiceState) -> dict[str, Any]:
        """A choice of a response sent whole."""
        raise NotImplementedError

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, default: int | None, param: str) -> int:
        """max_tokens as asked or as the context allows; a 400 when the prompt and it do not fit the context."""
        max_seq_len = self.engine.max_seq_len
        if prompt_len >= max_seq_len:
            raise self.gate.reject(400, "context_length", f"the prompt is {prompt_len} tokens; this model's context "
                                   f"is {max_seq_len} tokens", param=param, code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(default or max_seq_len, max_seq_len - prompt_len)
        if prompt_len + max_tokens > max_seq_len:
            raise self.gate.reject(400, "context_length", f"this model's context is {max_seq_len} tokens; the "
                                   f"prompt ({prompt_len}) plus max_tokens ({max_tokens}) exceeds it",
                                   param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def check_continuation(self, parsed: CommonRequest, prompts: list[list[int]], max_tokens: list[int]) -> None:
        """A continuation resumes one choice, with ids in the vocabulary and something left to generate."""
        if parsed.continuation is None:
            return
        reject = self.gate.reject
        if len(prompts) * parsed.n != 1:
            raise reject(400, "invalid", "continuation continues one choice: give one prompt and n = 1",
                         param="continuation")
        done = parsed.continuation.output_token_ids
        if any(not 0 <= token < self.served.model.spec.vocab_size for token in done):
            raise reject(400, "invalid", "continuation.output_token_ids must lie in the vocabulary",
                         param="continuation.output_token_ids")
        if len(done) >= max_tokens[0]:
            raise reject(400, "invalid", f"continuation has {len(done)} tokens: fewer than max_tokens "
                         f"({max_tokens[0]}) are needed for anything to continue", param="continuation")

    def sampling_params(self, parsed: CommonRequest, max_tokens: int, index: int, done_tokens: int) -> SamplingParams:
        """The engine's parameters for sample `index` of a prompt (seeds differ per sample)."""
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
                top_k=max(parsed.top_k, 0), seed=None if parsed.seed is None else parsed.seed + index,
                stop_token_ids=tuple(parsed.stop_token_ids or ()) + (
                    () if parsed.ignore_eos else self.served.other_eos_token_ids), ignore_eos=parsed.ignore_eos,
                min_tokens=min(max(parsed.min_tokens - done_tokens, 0), max_tokens),
                presence_penalty=parsed.presence_penalty, frequency_penalty=parsed.frequency_penalty,
                repetition_penalty=parsed.repetition_penalty,
                logit_bias=tuple((int(key), value) for key, value in (parsed.logit_bias or {}).items()),
                logprobs=parsed.top_logprobs_count(), prompt_logprobs=parsed.prompt_logprobs_count(),
            )
        except ValueError as error:
            raise self.gate.reject(400, "invalid", str(error)) from None

    def start(self, generation: Generation, max_tokens: list[int], arrival: float) -> AsyncIterator[tuple[int, Delta]]:
        """Put every choice's sequence into the engine; their deltas, interleaved."""
        parsed = generation.parsed
        stop = [parsed.stop] if isinstance(parsed.stop, str) else list(parsed.stop or [])
        done = parsed.continuation.output_token_ids if parsed.continuation is not None else []
        resume = (done, parsed.continuation.emitted_chars) if parsed.continuation is not None else None
        streams: list[AsyncIterator[Delta]] = []
        for choice in generation.choices:
            prompt = generation.prompts[choice.prompt_index] + done
            params = self.sampling_params(parsed, max_tokens[choice.prompt_index] - len(done),
                                          choice.index % parsed.n, len(done))
            sequence = self.engine.generate(f"{generation.request_id}-{choice.index}", prompt, params, stop, arrival,
                                            resume)
            streams.append(self.gate.track(sequence, len(prompt)))
        return merged(streams)

    async def respond(self, request: Request, parsed: CommonRequest, prompts: list[list[int]],
                      max_tokens: list[int], echo_texts: list[str]) -> Response:
        """Run the admitted prompts and answer: streamed, or whole once every choice has finished."""
        arrival = time.perf_counter()
        self.check_continuation(parsed, prompts, max_tokens)
        self.gate.admit_tokens(prompts, parsed.n)
        offset = parsed.continuation.emitted_chars if parsed.continuation is not None else 0
        choices = [ChoiceState(index, index // parsed.n, offset) for index in range(len(prompts) * parsed.n)]
        generation = Generation(f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), parsed, prompts,
                                echo_texts, choices)
        deltas = self.start(generation, max_tokens, arrival)
        if parsed.stream:
            return StreamingResponse(self._events(generation, deltas), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, generation, deltas)

    def _chunk(self, generation: Generation, choices: list[dict[str, Any]], usage: Any = None) -> str:
        parsed = generation.parsed
        body = {"id": generation.request_id, "object": self.chunk_object, "created": generation.created,
                "model": self.served.name, "choices": choices}
        if parsed.stream_options is not None and parsed.stream_options.include_usage:
            body["usage"] = usage
        return sse(body)

    async def _events(self, generation: Generation, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[str]:
        parsed = generation.parsed
        try:
            preamble = self.preamble(generation)
            if preamble:
                if parsed.return_token_ids:
                    for item in preamble:
                        item["token_ids"] = []
                yield self._chunk(generation, preamble)
            async with deadline(self.config.request_timeout_s):
                async for index, delta in deltas:
                    choice = generation.choices[index]
                    choice.completion_tokens = delta.num_output_tokens
                    items = self.stream_choices(generation, choice, delta)
                    for position, item in enumerate(items):
                        if parsed.return_token_ids:  # the delta's ids go with its last chunk (after an echo)
                            item["token_ids"] = delta.token_ids if position == len(items) - 1 else []
                        yield self._chunk(generation, [item])
            if parsed.stream_options is not None and parsed.stream_options.include_usage:
                yield self._chunk(generation, [], generation.usage())
        except Exception as error:  # the stream has begun: the error goes into it as an event
            api_error = failure_of(error, generation.request_id, self.config.request_timeout_s)
            yield sse({"error": {"message": api_error.message, "type": api_error.type, "param": None,
                                 "code": api_error.code}})
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]
        yield sse("[DONE]")

    async def _collect(self, request: Request, generation: Generation,
                       deltas: AsyncIterator[tuple[int, Delta]]) -> Response:
        async def collect() -> None:
            async for index, delta in deltas:
                choice = generation.choices[index]
                choice.completion_tokens = delta.num_output_tokens
                choice.add(delta)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        timeout_s = self.config.request_timeout_s
        collector = asyncio.create_task(collect())
        watcher = asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({collector, watcher}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collector, watcher):
                task.cancel()
            await asyncio.gather(collector, watcher, return_exceptions=True)
            await deltas.aclose()  # type: ignore[attr-defined]
        if collector not in done:
            if watcher in done:  # nobody is listening any more; the aborts above already freed the blocks
                return Response(status_code=499)
            raise ApiError(504, f"request timed out after {timeout_s} s", "timeout", code="timeout")
        if collector.exception() is not None:
            raise failure_of(collector.exception(), generation.request_id, timeout_s)
        choices = [self.final_choice(generation, choice) for choice in generation.choices]
        if generation.parsed.return_token_ids:
            for body, choice in zip(choices, generation.choices):
                body["token_ids"] = choice.token_ids
        return JSONResponse({"id": generation.request_id, "object": self.object_name, "created": generation.created,
                             "model": self.served.name, "choices": choices, "usage": generation.usage()})
