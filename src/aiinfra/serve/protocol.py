"""The OpenAI protocol as this server speaks it: request models, their limits, and the error envelope.

Every error is an OpenAI envelope `{"error": {"message", "type", "param", "code"}}`. Unknown fields that common
clients send are accepted and ignored, except those that would change what is sampled (refused by name, see
`UNSUPPORTED_SAMPLING_FIELDS`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiinfra.serve.async_engine import EngineDeadError, RequestRefusedError
from aiinfra.serve.request import MAX_LOGPROBS

logger = logging.getLogger(__name__)
MAX_PROMPTS = 2048  # OpenAI's limit on a list of prompts in one request
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
# Fields of OpenAI's or vLLM's APIs that would change what is sampled and that this server does not implement: a
# request that sets one to anything but its neutral value is refused (400, naming it) rather than served otherwise.
UNSUPPORTED_SAMPLING_FIELDS: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "use_beam_search": (None, False), "length_penalty": (None, 1), "min_p": (None, 0),
    "typical_p": (None, 1), "top_a": (None, 0), "suffix": (None, ""), "response_format": (None, {"type": "text"}),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "bad_words": (None, []), "allowed_token_ids": (None,), "prompt_logprobs": (None,),
    "logits_processors": (None,), "include_stop_str_in_output": (None, False), "truncate_prompt_tokens": (None,),
    "tools": (None, []), "functions": (None, []), "function_call": (None, "none"),
}


class ApiError(Exception):
    """An error returned to the client as an OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The envelope as an HTTP response."""
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


class StreamOptions(BaseModel):
    """What a stream sends besides its choices."""

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
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)  # vLLM's (0, inf), bounded so logits stay finite
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    return_token_ids: bool = False  # vLLM's name: each choice (each streamed chunk) carries its new token ids
    continuation: Continuation | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for item in [stop] if isinstance(stop, str) else stop or []:
            if len(item) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _valid_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"key {key!r}: logit_bias maps token ids (as strings) to biases")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias[{key}] = {value}: a bias must lie in [-100, 100]")
        return bias

    def num_prompts(self) -> int:
        """How many prompts the request holds (each becomes `n` sequences in the engine)."""
        return 1

    def top_logprobs_count(self) -> int | None:
        """Alternatives per generated token to return; None: no logprobs."""
        return None

    def prompt_logprobs_count(self) -> int | None:
        """Alternatives per prompt token to return; None: no prompt logprobs."""
        return None


class CompletionRequest(CommonRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        return self.logprobs if self.echo else None  # echo with logprobs scores the prompt

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


class ContentPart(BaseModel):
    """One part of a message's content; only text parts reach the model."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(CommonRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
