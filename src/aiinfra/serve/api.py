"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

The application only wires the pieces, as vLLM's entrypoints do: `protocol` (request models and the error
envelope), `admission` (the checks before the model and the bounded queue), `serving` (what both endpoint families
share) with `serving_completion` and `serving_chat` (one module per family).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiinfra.serve.admission import Gate, ServerConfig
from aiinfra.serve.async_engine import AsyncEngine
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.protocol import ApiError, internal_error
from aiinfra.serve.serving_chat import ChatServing
from aiinfra.serve.serving_completion import CompletionServing

__all__ = ["ServerConfig", "build_app"]


def build_app(engine: AsyncEngine, served: ServedModel, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application over a (not yet started) `AsyncEngine`; the app starts and stops it."""
    gate = Gate(engine, served, config or ServerConfig())
    completion_serving = CompletionServing(engine, served, gate)
    chat_serving = ChatServing(engine, served, gate)

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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion_serving.create(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat_serving.create(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gate.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": served.name, "object": "model", "created": 0, "owned_by": "aiinfra",
             "max_model_len": engine.max_seq_len}
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
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
