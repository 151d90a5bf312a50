"""The model runner: computes one scheduled step over a paged KV cache and samples the next tokens.

It reuses the modules and weights of `models.llama.Transformer` (norms, projections, MLPs, rotary tables) but
runs attention itself: the step's tokens of all requests are flattened into one (tokens, dim) batch for every
matrix multiply, each token's K and V are written to its slot in the cache, and attention reads each request's
keys back through its block table. Requests with one new token (decodes) share one padded attention call;
requests with several (prefill chunks) each get their own, causal from their first new position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aiinfra.models.llama import Transformer, apply_rotary
from aiinfra.serve.scheduler import ScheduledRequest, SchedulerOutput


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    spec = model.spec
    return 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * torch.empty(0, dtype=dtype).element_size()


class ModelRunner:
    """Owns the KV cache tensors; turns a `SchedulerOutput` into a dict of sampled token ids."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, seed: int = 0):
        self.model = model
        self.spec = model.spec
        self.block_size = block_size
        self.device = model.tok_embeddings.weight.device
        dtype = model.tok_embeddings.weight.dtype
        shape = (num_blocks * block_size, self.spec.n_kv_heads, self.spec.head_dim)
        # One flat slot axis per layer: slot = block_id * block_size + offset.
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.spec.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.spec.n_layers)]
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=self.device).manual_seed(seed)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        """Compute the scheduled tokens, write their KV, and sample for requests whose chunk reached the end."""
        for request_id in output.finished_ids:
            self.generators.pop(request_id, None)
        items = output.scheduled
        if not items:
            return {}
        model, device = self.model, self.device
        token_ids, positions, slots = [], [], []
        for item in items:
            end = item.start_position + len(item.token_ids)
            token_ids += item.token_ids
            positions += range(item.start_position, end)
            slots += self._slots(item.block_table, item.start_position, end)
        tokens = torch.tensor(token_ids, device=device)
        position_ids = torch.tensor(positions, device=device)
        slot_ids = torch.tensor(slots, device=device)
        attention = _AttentionPlan(items, self.block_size, device)

        x = model.tok_embeddings(tokens)
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings(position_ids)
        rope = None
        if self.spec.position == "rope":
            rope = (model.rope_cos[position_ids].unsqueeze(1), model.rope_sin[position_ids].unsqueeze(1))
        for layer, block in enumerate(model.layers.values()):
            hidden = block.attention_norm(x)
            module = block.attention
            q = module.wq(hidden).view(len(token_ids), -1, module.head_dim)
            k = module.wk(hidden).view(len(token_ids), -1, module.head_dim)
            v = module.wv(hidden).view(len(token_ids), -1, module.head_dim)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            self.k_cache[layer].index_copy_(0, slot_ids, k)
            self.v_cache[layer].index_copy_(0, slot_ids, v)
            attended = attention.run(q, self.k_cache[layer], self.v_cache[layer])
            x = x + module.wo(attended.reshape(len(token_ids), -1))
            x = x + block.feed_forward(block.ffn_norm(x))

        sample_rows, sampled_items = [], []
        row = 0
        for item in items:
            row += len(item.token_ids)
            if item.sample:
                sample_rows.append(row - 1)
                sampled_items.append(item)
        if not sampled_items:
            return {}
        logits = model.output(model.norm(x[sample_rows])).float()
        return dict(zip((item.request_id for item in sampled_items), self._sample(logits, sampled_items)))

    def _sample(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> list[int]:
        """Greedy rows by argmax; others by temperature, top-k, top-p, in the same order as `models.sample`."""
        for index, item in enumerate(items):
            if item.suppress_token_ids:
                logits[index, list(item.suppress_token_ids)] = float("-inf")
        chosen = logits.argmax(dim=-1).tolist()
        for index, item in enumerate(items):
            params = item.params
            if params.greedy:
                continue
            row = logits[index]
            if params.top_k > 0:
                threshold = row.topk(min(params.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < threshold, float("-inf"))
            probs = (row / params.temperature).softmax(dim=-1)
            if params.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest set whose mass reaches top_p (the first token always stays).
                drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
            chosen[index] = int(torch.multinomial(probs, 1, generator=self._generator(item)))
        return chosen

    def _generator(self, item: ScheduledRequest) -> torch.Generator:
        if item.params.seed is None:
            return self.default_generator
        generator = self.generators.get(item.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(item.params.seed)
            self.generators[item.request_id] = generator
        return generator


def _context_slots(tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Cache slots of positions 0..length-1 for each row of block tables (rows, blocks) -> (rows, length)."""
    offsets = torch.arange(block_size, device=tables.device)
    return (tables[:, :, None] * block_size + offsets).reshape(tables.shape[0], -1)[:, :length]


class _AttentionPlan:
    """Index tensors for one step's attention, built once and reused by every layer."""

    def __init__(self, items: list[ScheduledRequest], block_size: int, device: torch.device):
        self.prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (first row, rows, start position, slots)
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        row = 0
        for item in items:
            count, start = len(item.token_ids), item.start_position
            if count == 1:
                decode_rows.append(row)
                decode_tables.append(item.block_table)
                decode_lengths.append(start + 1)
            else:
                table = torch.tensor([item.block_table], device=device)
                self.prefills.append((row, count, start, _context_slots(table, block_size, start + count)[0]))
            row += count
        self.decode_index = self.decode_mask = self.decode_rows = None
        if decode_rows:
            widest = max(len(table) for table in decode_tables)
            tables = torch.tensor([table + [0] * (widest - len(table)) for table in decode_tables], device=device)
            longest = max(decode_lengths)
            # Padding slots point at real cache rows; the mask keeps them out of the softmax.
            self.decode_index = _context_slots(tables, block_size, longest)
            lengths = torch.tensor(decode_lengths, device=device)
            # (batch, 1 head, 1 query, keys): True where the key is part of that request's context.
            self.decode_mask = (torch.arange(longest, device=device) < lengths[:, None])[:, None, None, :]
            self.decode_rows = torch.tensor(decode_rows, device=device)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: (tokens, heads, head_dim) -> attention output of the same shape."""
        out = torch.empty_like(q)
        gqa = q.shape[1] != k_cache.shape[1]
        if self.decode_index is not None:
            query = q[self.decode_rows].unsqueeze(2)  # (batch, heads, 1, head_dim)
            # index_select on the flat slot axis is about twice as fast as advanced indexing with a 2-D index.
            shape = (*self.decode_index.shape, *k_cache.shape[1:])
            flat = self.decode_index.reshape(-1)
            keys = k_cache.index_select(0, flat).view(shape).transpose(1, 2)  # (batch, kv_heads, keys, head_dim)
            values = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=self.decode_mask, enable_gqa=gqa)
            out[self.decode_rows] = attended.squeeze(2)
        for first, count, start, context in self.prefills:
            query = q[first : first + count].transpose(0, 1).unsqueeze(0)
            keys = k_cache.index_select(0, context).transpose(0, 1).unsqueeze(0)
            values = v_cache.index_select(0, context).transpose(0, 1).unsqueeze(0)
            if start == 0:
                attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                # Query i sits at position start + i and sees every key up to there.
                key_positions = torch.arange(start + count, device=q.device)
                query_positions = torch.arange(start, start + count, device=q.device)
                mask = key_positions[None, :] <= query_positions[:, None]
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa)
            out[first : first + count] = attended[0].transpose(0, 1)
        return out
