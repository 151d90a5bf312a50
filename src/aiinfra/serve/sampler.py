"""From a step's logits to the next tokens: logit bias, penalties, greedy or temperature/top-k/top-p sampling, and
the log-probabilities clients asked for. The formulas are stated on `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aiinfra.serve.request import TokenLogprobs
from aiinfra.serve.scheduler import ScheduledRequest


@dataclass
class SampleOutput:
    """One step's sampled token per request, and the log-probabilities that were asked for."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    """request id -> (position of the first entry, entries): the prompt tokens this step's chunk predicted"""


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprobs]:
    """Rows of log-probabilities (rows, vocab) -> each row's entry for its token and its `top` best tokens."""
    rows = torch.arange(len(token_ids), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(token_ids, device=logprobs.device)].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprobs(token, logprob, best) for token, logprob, best in zip(token_ids, chosen, tops)]


def apply_penalties(row: torch.Tensor, item: ScheduledRequest) -> torch.Tensor:
    """One request's logits (vocab,) after its logit bias and penalties (CTRL's repetition, OpenAI's two)."""
    params = item.params
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        row[torch.tensor(ids, device=row.device)] += torch.tensor(biases, device=row.device, dtype=row.dtype)
    if item.history is None:
        return row
    prompt_ids, output_ids = item.history
    if params.repetition_penalty != 1:
        seen = torch.tensor(prompt_ids + output_ids, device=row.device).unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=row.device), minlength=row.numel()).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    return row


class Sampler:
    """Picks each request's next token, with a generator of its own for a request that gives a seed."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device).manual_seed(seed)

    def forget(self, request_ids: list[str]) -> None:
        """Drop the generators of requests that left the engine."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> SampleOutput:
        """logits: (len(items), vocab) float32, one row per sampled request, in the order of `items`."""
        wanted = [index for index, item in enumerate(items) if item.params.logprobs is not None]
        raw = logits[wanted].log_softmax(dim=-1) if wanted else None  # before anything changes the logits
        for index, item in enumerate(items):
            if item.suppress_token_ids:
                logits[index, list(item.suppress_token_ids)] = float("-inf")
            if item.params.logit_bias or item.history is not None:
                apply_penalties(logits[index], item)
        chosen = logits.argmax(dim=-1).tolist()
        for index, item in enumerate(items):
            if not item.params.greedy:
                chosen[index] = self._draw(logits[index], item)
        output = SampleOutput(sampled={item.request_id: token for item, token in zip(items, chosen)})
        if raw is not None:
            top = max(items[index].params.logprobs or 0 for index in wanted)
            entries = token_logprobs(raw, [chosen[index] for index in wanted], top)
            for index, entry in zip(wanted, entries):
                entry.top = entry.top[: items[index].params.logprobs]
                output.logprobs[items[index].request_id] = entry
        return output

    def _draw(self, row: torch.Tensor, item: ScheduledRequest) -> int:
        """Temperature, top-k, top-p, in the same order as `models.sample`."""
        params = item.params
        if params.top_k > 0:
            threshold = row.topk(min(params.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < threshold, float("-inf"))
        probs = (row / params.temperature).softmax(dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self._generator(item)))

    def _generator(self, item: ScheduledRequest) -> torch.Generator:
        if item.params.seed is None:
            return self.default_generator
        generator = self.generators.get(item.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(item.params.seed)
            self.generators[item.request_id] = generator
        return generator
