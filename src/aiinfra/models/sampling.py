"""Autoregressive sampling by full recomputation: the simple reference the serving engine is checked against."""

from __future__ import annotations

import torch

from aiinfra.models.llama import Transformer


@torch.no_grad()
def sample(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids`. temperature 0 is greedy; top_k 0 keeps the whole vocabulary."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids], device=device)
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.spec.max_seq_len :])[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            if top_k > 0:
                threshold = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            probs = (logits / temperature).softmax(dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == stop_id:
            break
        new_ids.append(next_id)
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
    return new_ids
