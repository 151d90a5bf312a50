"""The scheduler: each step, which requests run and how many tokens each computes. Pure bookkeeping, no torch.

Scheduling is a token budget, not prefill and decode phases: every request's computed-token count catches up to
its token count (prompt plus output). A step spends at most `max_num_batched_tokens`; a prompt longer than what
is left is computed in chunks over several steps (chunked prefill). A prefix-cache hit moves the computed count
forward before the first step, always leaving the last prompt token to compute so that there are logits to sample.
When the block manager says no, the last-admitted running request is preempted: its blocks are freed and it
returns to the front of the queue, to be recomputed later (its full blocks usually remain in the prefix cache).
An abort costs O(1) wherever the request is: the running batch is a dict in admission order, and a waiting request
is only marked finished, to be dropped when it reaches the front of the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aiinfra.serve.block_manager import BlockManager
from aiinfra.serve.request import Request, SamplingParams, Status


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `token_ids` at positions start_position..., then maybe sample."""

    request_id: str
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    sample: bool  # the chunk reaches the last known token, so its logits give the next token
    params: SamplingParams
    suppress_token_ids: tuple[int, ...] = ()  # stop tokens banned until min_tokens are out
    history: tuple[list[int], list[int]] | None = None  # (prompt, output) token ids, for a penalized request
    prompt_targets: list[int] = field(default_factory=list)  # prompt tokens that this chunk's rows predict


@dataclass
class SchedulerOutput:
    """The plain, serializable decision of one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # left the engine since the previous step

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(item.token_ids) for item in self.scheduled)


@dataclass
class StepUpdate:
    """What a step changed for one request: the token it produced (if any) and whether it finished."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    """Continuous batching over a paged KV cache: requests join and leave the running batch at every step."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_seq_len: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.waiting: deque[Request] = deque()  # may hold finished (aborted) requests, skipped at the front
        self.num_waiting = 0
        self.running: dict[str, Request] = {}  # in admission order: the last is the first to be preempted
        self.requests: dict[str, Request] = {}
        self.finished_since_last_step: list[str] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a new request; its prompt plus max_tokens must fit the context and the whole cache."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if not request.prompt_token_ids:
            raise ValueError("the prompt must hold at least one token")
        needed = len(request.prompt_token_ids) + request.params.max_tokens
        if needed > self.max_seq_len:
            raise ValueError(f"prompt plus max_tokens is {needed} tokens; the context holds {self.max_seq_len}")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_waiting += 1

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.finished_since_last_step)

    def finish(self, request_id: str, reason: str) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is Status.RUNNING:
            del self.running[request_id]
        else:
            self.num_waiting -= 1  # it stays in the deque, finished, until it reaches the front
        request.status, request.finish_reason = Status.FINISHED, reason
        self.blocks.free(request_id)
        self.finished_since_last_step.append(request_id)
        return request

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_waiting += 1
        self.num_preemptions += 1

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        params = request.params
        suppress = tuple(request.stop_ids()) if len(request.output_token_ids) < params.min_tokens else ()
        prompt_len = len(request.prompt_token_ids)
        # A decode step needs one output token: slice it without concatenating prompt and output (O(length)).
        tokens = (request.output_token_ids[start - prompt_len : end - prompt_len] if start >= prompt_len
                  else request.all_token_ids[start:end])
        sample = end == request.num_tokens
        wants_prompt = params.prompt_logprobs is not None and start + 1 < prompt_len
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=tokens,
            start_position=start,
            block_table=list(self.blocks.block_table(request.request_id)),
            sample=sample,
            params=params,
            suppress_token_ids=suppress,
            history=(request.prompt_token_ids, request.output_token_ids) if sample and params.penalized else None,
            prompt_targets=request.prompt_token_ids[start + 1 : end + 1] if wants_prompt else [],
        )

    def schedule(self) -> SchedulerOutput:
        """Decide one step: running requests first (in admission order), then waiting ones while budget lasts."""
        output = SchedulerOutput(finished_ids=self.finished_since_last_step)
        self.finished_since_last_step = []
        budget = self.max_num_batched_tokens
        for request in list(self.running.values()):
            if budget <= 0 or request.status is not Status.RUNNING:  # not running: preempted for one before it
                break
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request.request_id, request.num_computed_tokens + num_new):
                _, victim = self.running.popitem()
                self._preempt(victim)
                output.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                break
            output.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        # After a preemption memory is tight: admitting new work now would only cause more of them.
        while not output.preempted_ids and budget > 0 and len(self.running) < self.max_num_seqs:
            while self.waiting and self.waiting[0].status is Status.FINISHED:
                self.waiting.popleft()
            if not self.waiting:
                break
            request = self.waiting[0]
            # Keep the last token uncached: its logits are needed to sample the next token. Prompt logprobs need
            # the logits of every prompt position, so such a request computes its prompt in full.
            cached = ([] if request.params.prompt_logprobs is not None
                      else self.blocks.find_cached_prefix(request.all_token_ids[: request.num_tokens - 1]))
            num_computed = len(cached) * self.blocks.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if not self.blocks.allocate(request.request_id, num_computed + num_new, cached):
                break
            self.waiting.popleft()
            self.num_waiting -= 1
            if not request.output_token_ids:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = Status.RUNNING
            self.running[request.request_id] = request
            output.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return output

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[StepUpdate]:
        """Advance computed counts, append sampled tokens, and finish requests that hit a stop condition."""
        updates = []
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:  # aborted while the step ran
                continue
            request.num_computed_tokens += len(item.token_ids)
            if self.blocks.has_new_full_blocks(request.request_id, request.num_computed_tokens):
                self.blocks.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
            if not item.sample:
                continue
            token = sampled[item.request_id]
            reason = None
            if token in request.stop_ids():
                reason = "stop"
            else:
                request.output_token_ids.append(token)
                if len(request.output_token_ids) >= request.params.max_tokens or request.num_tokens >= self.max_seq_len:
                    reason = "length"
            if reason is not None:
                self.finish(request.request_id, reason)
            updates.append(StepUpdate(request, [] if reason == "stop" else [token], reason is not None))
        return updates
