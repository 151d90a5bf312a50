"""The OpenAI-compatible HTTP layer: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Cheap checks come first, in this order, so that a flood of bad or excess requests costs little: API key (401),
body size (413), JSON and parameters (400), admission by queued requests (503), then tokenization, context length
(400, `context_length_exceeded`) and admission by queued prompt tokens (503). Every error is an OpenAI envelope
`{"error": {"message", "type", "param", "code"}}`. Unknown fields that common clients send are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiinfra.data.tokenizer import encode
from aiinfra.serve.async_engine import AsyncEngine, Delta, EngineDeadError, RequestRefusedError
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.request import SamplingParams

logger = logging.getLogger(__name__)
MAX_PROMPTS = 2048  # OpenAI's limit on a list of prompts in one request
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass
class ServerConfig:
    """Limits and access control of the HTTP layer."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_waiting_requests: int = 256  # queued beyond the running batch
    max_waiting_tokens: int = 1 << 18  # prompt tokens of requests that have not produced their first token
    request_timeout_s: float = 600.0
    retry_after_s: int = 1


class ApiError(Exception):
    """An error returned to the client as an OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def internal_error(error: BaseException, request_id: str, context: str) -> ApiError:
    """A 500 that names the request id and nothing of the exception; the traceback goes to the server's log."""
    logger.error("%s %s: internal error", context, request_id, exc_info=error)
    return ApiError(500, f"internal server error (request {request_id}); the server's log has the details",
                    "server_error", code="internal_error", headers={"X-Request-Id": request_id})


def failure_of(error: BaseException, request_id: str, timeout_s: float) -> ApiError:
    """The client's view of a request that failed after it was admitted."""
    if isinstance(error, TimeoutError):
        return ApiError(504, f"request timed out after {timeout_s} s", "timeout", code="timeout")
    if isinstance(error, RequestRefusedError):
        return ApiError(400, str(error))
    if isinstance(error, EngineDeadError):
        logger.error("%s: %s", request_id, error)
        return ApiError(503, f"the model engine failed during request {request_id}; see /health and the server's log",
                        "server_error", code="engine_stopped")
    return internal_error(error, request_id, "generation")


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


class StreamOptions(BaseModel):
    include_usage: bool = False


class Continuation(BaseModel):
    """An answer another server began (sent by `aiinfra route` on mid-stream failover): its generated token ids
    and how many characters of their text the client has already received."""

    output_token_ids: list[int] = Field(min_length=1)
    emitted_chars: int = Field(0, ge=0)


class CommonRequest(BaseModel):
    """Parameters shared by completions and chat; extra vendor fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 is vLLM's spelling of "no top-k"
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logprobs: Any = None
    return_token_ids: bool = False  # vLLM's name: each choice (each streamed chunk) carries its new token ids
    continuation: Continuation | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for item in [stop] if isinstance(stop, str) else stop or []:
            if len(item) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return stop

    def num_prompts(self) -> int:
        """How many prompts the request holds (each becomes `n` sequences in the engine)."""
        return 1


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt_list(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"a list of {len(prompt)} prompts; at most {MAX_PROMPTS} are accepted in one request")
        return prompt

    def num_prompts(self) -> int:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return len(self.prompt)
        return 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Admission:
    """The bounded waiting queue, counted in requests and in prompt tokens, checked on the event loop."""

    def __init__(self, max_running: int, config: ServerConfig):
        self.max_requests = max_running + config.max_waiting_requests
        self.max_tokens = config.max_waiting_tokens
        self.in_flight = 0
        self.queued_tokens = 0


class _Tracked:
    """A request's deltas, holding its place in the admission counts from creation until it ends or is dropped.

    A class rather than an async generator: a generator that is never started never runs its `finally`.
    """

    def __init__(self, admission: Admission, generator: AsyncIterator[Delta], prompt_tokens: int):
        self.admission, self.generator, self.prompt_tokens = admission, generator, prompt_tokens
        admission.in_flight += 1
        admission.queued_tokens += prompt_tokens
        self.queued = self.live = True

    def _unqueue(self) -> None:
        if self.queued:
            self.admission.queued_tokens -= self.prompt_tokens
            self.queued = False

    def _release(self) -> None:
        self._unqueue()
        if self.live:
            self.admission.in_flight -= 1
            self.live = False

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> Delta:
        try:
            delta = await self.generator.__anext__()
        except BaseException:
            self._release()
            raise
        self._unqueue()
        return delta

    async def aclose(self) -> None:
        self._release()
        await self.generator.aclose()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        self._release()


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: AsyncEngine, served: ServedModel, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application over a (not yet started) `AsyncEngine`; the app starts and stops it."""
    config = config or ServerConfig()
    metrics = engine.metrics
    tokenizer = served.tokenizer
    max_seq_len = engine.max_seq_len
    admission = Admission(engine.max_num_seqs, config)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(served.chat_template)
    eos_text = tokenizer.id_to_token(served.eos_token_id) if served.eos_token_id is not None else ""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="aiinfra", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return internal_error(error, f"req-{uuid.uuid4().hex}", f"{request.method} {request.url.path}").response()

    def reject(status: int, reason: str, message: str, **kwargs: Any) -> ApiError:
        metrics.requests_rejected.labels(reason).inc()
        return ApiError(status, message, **kwargs)

    expected_authorization = None if config.api_key is None else f"Bearer {config.api_key}".encode()

    def authorize(request: Request) -> None:
        """401 unless the request carries the key; compared in constant time, so timing does not reveal it."""
        if expected_authorization is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected_authorization):
            raise reject(401, "unauthorized", "invalid or missing API key (expected 'Authorization: Bearer KEY')",
                         code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise reject(413, "body_too_large", f"request body over {config.max_body_bytes} bytes",
                         code="request_too_large")
        body = b""
        async for chunk in request.stream():  # bounded even when the client sends no content-length
            body += chunk
            if len(body) > config.max_body_bytes:
                raise reject(413, "body_too_large", f"request body over {config.max_body_bytes} bytes",
                             code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise reject(400, "invalid", f"request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise reject(400, "invalid", "request body must be a JSON object")
        return data

    def validate(model_type: type[CommonRequest], data: dict[str, Any]) -> Any:
        try:
            parsed = model_type.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            raise reject(400, "invalid", f"{param}: {first['msg']}", param=param) from None
        if parsed.model is not None and parsed.model != served.name:
            raise ApiError(404, f"model {parsed.model!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        if parsed.logprobs not in (None, False, 0):
            raise reject(400, "invalid", "logprobs are not supported by this server", param="logprobs")
        if not engine.is_running:  # a dead engine process: fail now, not at the request timeout
            raise reject(503, "engine_stopped", "the model engine is not running (see /health); restart the server",
                         type_="server_error", code="engine_stopped")
        # Every prompt runs n sequences: a request is admitted for all of them or for none.
        if admission.in_flight + parsed.num_prompts() * parsed.n > admission.max_requests:
            raise reject(503, "queue_full_requests", "the server is at capacity; retry later", type_="server_error",
                         code="queue_full", headers={"Retry-After": str(config.retry_after_s)})
        return parsed

    def sampling_params(parsed: CommonRequest, max_tokens: int, index: int, done_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
                top_k=max(parsed.top_k, 0), seed=None if parsed.seed is None else parsed.seed + index,
                stop_token_ids=tuple(parsed.stop_token_ids or ()), ignore_eos=parsed.ignore_eos,
                min_tokens=min(max(parsed.min_tokens - done_tokens, 0), max_tokens),
            )
        except ValueError as error:
            raise reject(400, "invalid", str(error)) from None

    def resolve_max_tokens(requested: int | None, prompt_len: int, default: int | None, param: str) -> int:
        if prompt_len >= max_seq_len:
            raise reject(400, "context_length", f"the prompt is {prompt_len} tokens; this model's context is "
                         f"{max_seq_len} tokens", param=param, code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(default or max_seq_len, max_seq_len - prompt_len)
        if prompt_len + max_tokens > max_seq_len:
            raise reject(400, "context_length", f"this model's context is {max_seq_len} tokens; the prompt "
                         f"({prompt_len}) plus max_tokens ({max_tokens}) exceeds it", param="max_tokens",
                         code="context_length_exceeded")
        return max_tokens

    def admit_tokens(prompts: list[list[int]], n: int) -> None:
        tokens = sum(len(prompt) for prompt in prompts) * n
        if admission.queued_tokens + tokens > admission.max_tokens:
            raise reject(503, "queue_full_tokens", "the server's queue holds too many prompt tokens; retry later",
                         type_="server_error", code="queue_full", headers={"Retry-After": str(config.retry_after_s)})

    async def merged(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
        """Interleave the deltas of several choices; closing this cancels them all (which aborts them)."""
        if len(streams) == 1:
            try:
                async for delta in streams[0]:
                    yield 0, delta
            finally:
                await streams[0].aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
            try:
                async for delta in stream:
                    await queue.put((index, delta))
            except Exception as error:
                await queue.put((index, error))
            finally:
                await stream.aclose()
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

    def check_continuation(parsed: CommonRequest, prompts: list[list[int]], max_tokens: list[int]) -> None:
        if parsed.continuation is None:
            return
        if len(prompts) * parsed.n != 1:
            raise reject(400, "invalid", "continuation continues one choice: give one prompt and n = 1",
                         param="continuation")
        done = parsed.continuation.output_token_ids
        if any(not 0 <= token < served.model.spec.vocab_size for token in done):
            raise reject(400, "invalid", "continuation.output_token_ids must lie in the vocabulary",
                         param="continuation.output_token_ids")
        if len(done) >= max_tokens[0]:
            raise reject(400, "invalid", f"continuation has {len(done)} tokens: fewer than max_tokens "
                         f"({max_tokens[0]}) are needed for anything to continue", param="continuation")

    def start(prompts: list[list[int]], parsed: CommonRequest, max_tokens: list[int], request_id: str,
              arrival: float) -> AsyncIterator[tuple[int, Delta]]:
        stop = [parsed.stop] if isinstance(parsed.stop, str) else list(parsed.stop or [])
        done = parsed.continuation.output_token_ids if parsed.continuation is not None else []
        resume = (done, parsed.continuation.emitted_chars) if parsed.continuation is not None else None
        choices = [(prompt + done, sampling_params(parsed, max_tokens[prompt_index] - len(done), sample_index,
                                                   len(done)))
                   for prompt_index, prompt in enumerate(prompts) for sample_index in range(parsed.n)]
        streams: list[AsyncIterator[Delta]] = [
            _Tracked(admission, engine.generate(f"{request_id}-{choice}", prompt, params, stop, arrival, resume),
                     len(prompt))
            for choice, (prompt, params) in enumerate(choices)
        ]
        return merged(streams)

    def usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(prompt) for prompt in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def error_event(error: BaseException, request_id: str) -> str:
        api_error = failure_of(error, request_id, config.request_timeout_s)
        body = {"error": {"message": api_error.message, "type": api_error.type, "param": None,
                          "code": api_error.code}}
        return _sse(body)

    async def respond(request: Request, kind: Literal["completion", "chat"], parsed: CommonRequest,
                      prompts: list[list[int]], max_tokens: list[int], echo_texts: list[str]) -> Response:
        arrival = time.perf_counter()
        request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        num_choices = len(prompts) * parsed.n
        check_continuation(parsed, prompts, max_tokens)
        admit_tokens(prompts, parsed.n)
        deltas = start(prompts, parsed, max_tokens, request_id, arrival)
        object_name = "text_completion" if kind == "completion" else "chat.completion"

        def choice_chunk(index: int, text: str | None, finish: str | None, first: bool = False,
                         token_ids: list[int] | None = None) -> dict[str, Any]:
            if kind == "completion":
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            else:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if parsed.return_token_ids:
                choice["token_ids"] = token_ids or []
            return choice

        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            chunk_object = "text_completion" if kind == "completion" else "chat.completion.chunk"

            def chunk(choices: list[dict[str, Any]], usage_value: Any = None) -> str:
                body = {"id": request_id, "object": chunk_object, "created": created, "model": served.name,
                        "choices": choices}
                if include_usage:
                    body["usage"] = usage_value
                return _sse(body)

            async def events() -> AsyncIterator[str]:
                completion_tokens = [0] * num_choices
                try:
                    if kind == "chat":
                        yield chunk([choice_chunk(i, None, None, first=True) for i in range(num_choices)])
                    elif getattr(parsed, 'echo', False):
                        yield chunk([choice_chunk(i, echo_texts[i // parsed.n], None) for i in range(num_choices)])
                    async with deadline(config.request_timeout_s):
                        async for index, delta in deltas:
                            completion_tokens[index] = delta.num_output_tokens
                            yield chunk([choice_chunk(index, delta.text, delta.finish_reason,
                                                      token_ids=delta.token_ids)])
                    if include_usage:
                        yield chunk([], usage(prompts, sum(completion_tokens)))
                except Exception as error:  # the stream has begun: the error goes into it as an event
                    yield error_event(error, request_id)
                finally:
                    await deltas.aclose()
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [echo_texts[i // parsed.n] if getattr(parsed, 'echo', False) else "" for i in range(num_choices)]
        finish_reasons: list[str | None] = [None] * num_choices
        completion_tokens = [0] * num_choices
        token_ids: list[list[int]] = [[] for _ in range(num_choices)]

        async def collect() -> None:
            async for index, delta in deltas:
                texts[index] += delta.text
                token_ids[index] += delta.token_ids
                completion_tokens[index] = delta.num_output_tokens
                if delta.finish_reason is not None:
                    finish_reasons[index] = delta.finish_reason

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        collector = asyncio.create_task(collect())
        watcher = asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({collector, watcher}, timeout=config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collector, watcher):
                task.cancel()
            await asyncio.gather(collector, watcher, return_exceptions=True)
            await deltas.aclose()
        if collector not in done:
            if watcher in done:  # nobody is listening any more; the aborts above already freed the blocks
                return Response(status_code=499)
            raise ApiError(504, f"request timed out after {config.request_timeout_s} s", "timeout", code="timeout")
        if collector.exception() is not None:
            raise failure_of(collector.exception(), request_id, config.request_timeout_s)
        if kind == "completion":
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish_reasons[i]}
                       for i in range(num_choices)]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": finish_reasons[i]} for i in range(num_choices)]
        if parsed.return_token_ids:
            for choice, ids in zip(choices, token_ids):
                choice["token_ids"] = ids
        return JSONResponse({"id": request_id, "object": object_name, "created": created, "model": served.name,
                             "choices": choices, "usage": usage(prompts, sum(completion_tokens))})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed: CompletionRequest = validate(CompletionRequest, await read_body(request))
        prompt = parsed.prompt
        if isinstance(prompt, str):
            raw_prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            raw_prompts = [prompt]  # type: ignore[list-item]
        else:
            raw_prompts = list(prompt)  # type: ignore[arg-type]
        if not raw_prompts:
            raise reject(400, "invalid", "prompt is empty", param="prompt")
        prompts = []
        for item in raw_prompts:
            ids = encode(tokenizer, item) if isinstance(item, str) else list(item)
            if not ids:
                raise reject(400, "invalid", "prompt is empty: give at least one token", param="prompt")
            if any(not 0 <= token < served.model.spec.vocab_size for token in ids):
                raise reject(400, "invalid", "prompt token ids must lie in the vocabulary", param="prompt")
            prompts.append(ids)
        max_tokens = [resolve_max_tokens(parsed.max_tokens, len(ids), 16, "prompt") for ids in prompts]
        echo_texts = [item if isinstance(item, str) else tokenizer.decode(item) for item in raw_prompts]
        return await respond(request, "completion", parsed, prompts, max_tokens, echo_texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed: ChatRequest = validate(ChatRequest, await read_body(request))
        messages = [{"role": message.role, "content": message.text()} for message in parsed.messages]
        try:
            text = template.render(messages=messages, add_generation_prompt=True, bos_token=served.bos_token,
                                   eos_token=eos_text)
        except Exception as error:  # a template may raise on role orders it does not accept
            raise reject(400, "invalid", f"messages: the chat template refused them: {error}",
                         param="messages") from None
        ids = encode(tokenizer, text)
        requested = parsed.max_completion_tokens or parsed.max_tokens
        max_tokens = resolve_max_tokens(requested, len(ids), None, "messages")
        return await respond(request, "chat", parsed, [ids], [max_tokens], [""])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": served.name, "object": "model", "created": 0, "owned_by": "aiinfra", "max_model_len": max_seq_len}
        ]})

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "engine stopped", "engine_pid": engine.core.pid}, status_code=503)
        return JSONResponse({"status": "ok", "running": engine.stats.num_running,
                             "waiting": engine.stats.num_waiting, "kv_cache_usage": engine.stats.kv_cache_usage,
                             "engine_pid": engine.core.pid})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
