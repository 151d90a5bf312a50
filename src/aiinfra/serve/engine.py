"""The engine: one step reads schedule, execute, update. Synchronous; `async_engine` drives it from a thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aiinfra.models.llama import Transformer
from aiinfra.serve.block_manager import BlockManager
from aiinfra.serve.request import Request, SamplingParams, TokenLogprobs
from aiinfra.serve.runner import PagedModelRunner, kv_bytes_per_token
from aiinfra.serve.scheduler import Scheduler
from aiinfra.serve.tensor_parallel import TensorParallelGroup


class EngineConfig(BaseModel):
    """Sizes of the batch and of the paged KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, description="token slots per KV block")
    kv_cache_memory_bytes: int = Field(256 * 2**20, ge=1, description="memory budget of the KV cache")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks; overrides kv_cache_memory_bytes when set")
    max_num_seqs: int = Field(64, ge=1, description="requests in the running batch at most")
    max_num_batched_tokens: int = Field(512, ge=1, description="tokens computed per step (prompts beyond are chunked)")
    enable_prefix_caching: bool = Field(True, description="share the KV blocks of common prompt prefixes")
    seed: int = Field(0, description="seed of sampling for requests that give none")
    attention_backend: Literal["auto", "native", "torch"] = Field(
        "auto", description="decode attention on CPU: native (aiinfra's kernel over the paged cache, compiled on first "
        "use), torch (gather the blocks, then SDPA), or auto (native where it builds, else torch)")
    pack_weights: bool = Field(
        True, description="on CPU, a oneDNN-packed second copy of each Linear weight: faster batched matmuls for "
        "twice the weight memory")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    """one entry per new token when the request asked for logprobs"""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """with the request's first output, when it asked for them: one per prompt token (None for the first)"""


@dataclass
class EngineStats:
    """The engine's state after a step, for metrics and admission control."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    num_blocks: int = 0
    prefix_cache_hit_tokens: int = 0


class LLMEngine:
    """Continuous batching over a paged KV cache for one model on one device."""

    def __init__(self, model: Transformer, config: EngineConfig | None = None, eos_token_id: int | None = None,
                 tensor_parallel: TensorParallelGroup | None = None):
        """`tensor_parallel`: `model` is this rank's shard; rank 0 schedules and sends each step's plan to the
        others, which run `serve_plans`. Every rank sizes its cache from the same budget, so their block counts
        agree."""
        self.config = config = config or EngineConfig()
        self.tp = tensor_parallel
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        spec = model.spec
        num_blocks = config.num_blocks
        if num_blocks is None:
            bytes_per_block = kv_bytes_per_token(model, model.tok_embeddings.weight.dtype) * config.block_size
            num_blocks = config.kv_cache_memory_bytes // bytes_per_block
        needed = -(-spec.max_seq_len // config.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens; one full-context request "
                f"(max_seq_len={spec.max_seq_len}) needs {needed}: raise kv_cache_memory_bytes or num_blocks"
            )
        self.num_blocks = num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, spec.max_seq_len
        )
        self.runner = PagedModelRunner(
            model, num_blocks, config.block_size, config.seed, pack_weights=config.pack_weights,
            rows_hint=config.max_num_seqs, tensor_parallel=tensor_parallel,
            attention_backend=config.attention_backend)

    @property
    def max_seq_len(self) -> int:
        return self.model.spec.max_seq_len

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError when it cannot fit the context."""
        self.scheduler.add(Request(request_id, list(prompt_token_ids), params, self.eos_token_id))

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its KV blocks at once (no-op if it already finished)."""
        self.scheduler.finish(request_id, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: one iteration of the running batch."""
        scheduled = self.scheduler.schedule()
        if self.tp is not None:
            self.tp.broadcast(scheduled)
        result = self.runner.execute(scheduled)
        for request_id, (first, entries) in result.prompt_logprobs.items():
            request = self.scheduler.requests.get(request_id)
            if request is not None:  # a recomputation after a preemption writes the same values again
                if request.prompt_logprobs is None:
                    request.prompt_logprobs = [None] * len(request.prompt_token_ids)
                request.prompt_logprobs[first : first + len(entries)] = entries
        outputs = []
        for update in self.scheduler.update(scheduled, result.sampled):
            request = update.request
            logprobs = None
            if request.params.logprobs is not None:
                entry = result.logprobs.get(request.request_id)
                logprobs = [entry] if entry is not None and update.new_token_ids else []
            first_output = len(request.output_token_ids) == len(update.new_token_ids)
            outputs.append(RequestOutput(
                request_id=request.request_id,
                new_token_ids=update.new_token_ids,
                finished=update.finished,
                finish_reason=request.finish_reason,
                num_prompt_tokens=len(request.prompt_token_ids),
                num_output_tokens=len(request.output_token_ids),
                num_cached_tokens=request.num_cached_tokens,
                logprobs=logprobs,
                prompt_logprobs=request.prompt_logprobs if first_output else None,
            ))
        return outputs

    def serve_plans(self) -> None:
        """A rank other than 0: execute each step's plan as rank 0 sends it, until it sends None."""
        assert self.tp is not None and self.tp.rank != 0
        try:
            while (plan := self.tp.broadcast(None)) is not None:
                self.runner.execute(plan)
        finally:
            self.tp.close()

    def close(self) -> None:
        """Tell the other ranks to stop (tensor parallel; nothing otherwise)."""
        if self.tp is not None:
            self.tp.broadcast(None)
            self.tp.close()
            self.tp = None

    def stats(self) -> EngineStats:
        """A snapshot of queue lengths, cache usage and preemptions so far."""
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_blocks=self.num_blocks,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline batch generation: run every prompt to completion together; returns new token ids per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        outputs: dict[str, list[int]] = {}
        for index, (prompt, request_params) in enumerate(zip(prompts, params_list)):
            self.add_request(f"offline-{index}", prompt, request_params)
            outputs[f"offline-{index}"] = []
        while self.has_unfinished():
            for output in self.step():
                outputs[output.request_id] += output.new_token_ids
        return [outputs[f"offline-{index}"] for index in range(len(prompts))]
