"""A request's sampling parameters and its life in the engine (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop, and which log-probabilities to return.

    Penalties follow their references: `repetition_penalty` is CTRL's (Keskar et al. 2019, as in HF and vLLM: over
    prompt and output tokens, a positive logit is divided by it and a negative one multiplied); `presence_penalty`
    and `frequency_penalty` are OpenAI's (over output tokens: logit -= frequency * count + presence * (count > 0));
    `logit_bias` is added to the logits first. Log-probabilities are of the model's own distribution (the
    log-softmax of its logits, before any of these; vLLM's default), for the chosen token and the `logprobs` most
    likely ones; `prompt_logprobs` asks the same for every prompt token (the prompt is then computed in full, not
    taken from the prefix cache).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 keeps the whole vocabulary)")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}: must be in 0..max_tokens={self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name}={value}: must be in 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so near it that dividing by it would overflow (vLLM's epsilon)."""
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the request's token history (a penalty is set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class TokenLogprobs:
    """The log-probability of one token at its position, and the most likely tokens there (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence: its prompt, the tokens generated so far, and how many of them have KV in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # by position; None at 0 (nothing predicts it)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def stop_ids(self) -> set[int]:
        """Token ids that end the request (end-of-text unless ignored, plus any the caller named)."""
        ids = set(self.params.stop_token_ids)
        if self.eos_token_id is not None and not self.params.ignore_eos:
            ids.add(self.eos_token_id)
        return ids
