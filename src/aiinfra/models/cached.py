"""One step of the decoder with a key/value cache, as an exportable module (for ONNX Runtime and other runtimes).

`CachedTransformer(model)` shares `model`'s weights and maps (input_ids, past keys and values of every layer) to
(logits, present keys and values): the new tokens attend to the past ones and causally to each other, and the
present tensors are the past ones with the new tokens' keys and values appended. A past of length 0 is a prefill;
each further call with one token is one decode step, instead of a recompute of the whole sequence. The cached
keys hold the rotary rotation already applied, as Hugging Face's `past_key_values` do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aiinfra.models.llama import Transformer, apply_rotary


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The graph's cache input and output names, in argument order: past_key_values.{i}.key/value, present.{i}..."""
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return past, present


class CachedTransformer(nn.Module):
    """(input_ids (batch, seq), *past (batch, kv_heads, past_seq, head_dim) per layer, key then value) ->
    (logits (batch, seq, vocab), *present (batch, kv_heads, past_seq + seq, head_dim))."""

    def __init__(self, model: Transformer):
        super().__init__()
        if model.output is None or model.tok_embeddings is None:
            raise ValueError("CachedTransformer needs a whole model, not a pipeline stage")
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, spec = self.model, self.model.spec
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        positions = torch.arange(seq, device=input_ids.device) + past_len
        x = model.tok_embeddings(input_ids)
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings(positions)
        rope = None
        if spec.position == "rope":
            rope = (model.rope_cos[positions], model.rope_sin[positions])
        # Query i (at position past_len + i) sees every key at a position <= its own.
        visible = torch.arange(past_len + seq, device=input_ids.device)[None, :] <= positions[:, None]
        presents: list[torch.Tensor] = []
        for index, block in enumerate(model.layers.values()):
            h = block.attention_norm(x)
            attention = block.attention
            q = attention.wq(h).view(batch, seq, -1, spec.head_dim).transpose(1, 2)
            k = attention.wk(h).view(batch, seq, -1, spec.head_dim).transpose(1, 2)
            v = attention.wv(h).view(batch, seq, -1, spec.head_dim).transpose(1, 2)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            # expand: a default (omitted) past of batch 1 and length 0 serves any batch.
            k = torch.cat([past[2 * index].expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([past[2 * index + 1].expand(batch, -1, -1, -1), v], dim=2)
            presents += [k, v]
            groups = q.shape[1] // k.shape[1]
            keys, values = (k, v) if groups == 1 else (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
            x = x + attention.wo(out.transpose(1, 2).reshape(batch, seq, -1))
            x = x + block.feed_forward(block.ffn_norm(x))
        return (model.output(model.norm(x)), *presents)

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        """A past of length 0 for every layer (what a prefill starts from)."""
        spec = self.model.spec
        shape = (batch, spec.n_kv_heads, 0, spec.head_dim)
        device = self.model.tok_embeddings.weight.device
        return [torch.zeros(shape, device=device) for _ in range(2 * spec.n_layers)]
