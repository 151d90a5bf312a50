"""The model runner: computes one scheduled step over a paged KV cache and samples the next tokens.

It reuses the modules and weights of `models.llama.Transformer` (norms, projections, MLPs, rotary tables) but
runs the layers itself: the step's tokens of all requests are flattened into one (tokens, dim) batch for every
matrix multiply, and each token's K and V are written to its slot in the cache. Decode attention (one new token)
runs in the native kernel (`kernels/paged_attention.cpp`), which reads each request's keys and values in place
through its block table, all decodes of a step in one call per layer; without it (`attention_backend="torch"`, or
no compiler) decodes gather whole blocks and share padded SDPA calls in groups of 8. Requests with several new
tokens (prefill chunks) each get their own SDPA call over their gathered blocks, causal from their first new
position.

On CPU (fp32 or bf16, as the model is), each fused projection's weights are one (in, out) matrix that the modules'
own weights are views of, plus a oneDNN-packed copy; which of the two serves 1- and 2-row inputs is measured at
start-up on the machine itself (see `FusedLinear`; `store_weights_transposed` gives the Linears outside a fused
projection the same (in, out) layout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aiinfra.models.llama import FeedForward, Transformer, apply_rotary
from aiinfra.serve.kernels import ATTENTION_BACKENDS, paged_decode_attention
from aiinfra.serve.sampler import SampleOutput, Sampler, token_logprobs
from aiinfra.serve.scheduler import ScheduledRequest, SchedulerOutput
from aiinfra.serve.tensor_parallel import TensorParallelGroup, embed

log = logging.getLogger(__name__)


def local_kv_heads(model: Transformer) -> int:
    """KV heads this process holds: all of them, or its share under tensor parallelism (read off the weights)."""
    attention = next(iter(model.layers.values())).attention
    return attention.wk.out_features // model.spec.head_dim


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers (in this process)."""
    spec = model.spec
    return 2 * spec.n_layers * local_kv_heads(model) * spec.head_dim * torch.empty(0, dtype=dtype).element_size()


def store_weights_transposed(model: nn.Module) -> None:
    """Keep each Linear weight in memory as (in, out), exposed to its module as the usual (out, in) transpose.

    Same values and same module behaviour; `F.linear` then hands the CPU GEMM a contiguous right-hand side, which
    measured 1.3x to 2.6x faster for wide outputs (the output head, the MLP's up projections) at 1 to 32 rows and
    about even elsewhere. A weight shared with an embedding keeps its layout (embedding rows must stay contiguous).
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in embedding_weights:
            if module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()


class FusedLinear:
    """Projections of one input computed as one matrix multiply, their outputs side by side.

    On CPU the weights are concatenated along the output into one (in, out) matrix, and the modules' own weights
    become views of it (no second copy), and a oneDNN-packed copy is made beside it. 3 rows or more always take the
    packed copy (1.3x to 4x faster than `mm` at 4 to 100 rows on both CPUs measured). For 1 and 2 rows (decode at
    small batch, memory-bound) which is faster depends on the CPU: on a Xeon with AMX `mm` over the (in, out)
    matrix was 1.1x to 1.5x faster in fp32 and the packed copy 1.7x to 2.8x faster in bf16; on an EPYC (AVX-512, no
    AMX) the packed copy won both (125m decode at batch 1: 30-35 against 25-26 ms in fp32). So the engine measures
    it on the machine it runs on (`choose_small_batch_paths`) and sets `min_rows` per projection.
    Modules that cannot take part (Int8Linear, a weight tied to an embedding, other devices) run as they are. Both
    are built with the engine: weights replaced afterwards (load_state_dict, .to()) are not seen, and the packed copy
    does not follow in-place changes either; build a new engine after changing weights.
    """

    min_packed_rows = 3  # until `choose_small_batch_paths` has measured 1 and 2 rows

    def __init__(self, modules: list[nn.Module], rows_hint: int, pack: bool, tied: set[int] = frozenset()):
        self.modules = modules
        self.min_rows = self.min_packed_rows
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if not all(can_fuse(module) and id(module.weight) not in tied for module in modules):
            return
        if any(module.bias is not None for module in modules):
            self.bias = torch.cat([
                module.bias.detach() if module.bias is not None else module.weight.new_zeros(module.out_features)
                for module in modules
            ])
        self.weight_t = torch.cat([module.weight.detach() for module in modules]).t().contiguous()
        offset = 0
        for module in modules:
            module.weight.data = self.weight_t[:, offset : offset + module.out_features].t()
            offset += module.out_features
        if pack and all(can_pack(module) for module in modules):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight_t.t().contiguous(), rows_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, in_features) -> (rows, sum of out_features)."""
        if self.packed is not None and x.shape[0] >= self.min_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.weight_t is not None:
            return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        outs = [module(x) for module in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def choose_small_batch_paths(projections: list[FusedLinear], sweeps: int = 3, per_shape: int = 4) -> dict:
    """Set each projection's `min_rows` from a measurement of `mm` against the packed copy at 1 and 2 rows.

    Per weight shape, up to `per_shape` projections of that shape (different layers) are called in turn, so that
    their weights come from memory as in a decode step rather than from a warm cache; the best of `sweeps` sweeps
    counts. Every projection of a shape then takes the packed copy from the smallest row count where it was faster.
    Returns {(in, out): min_rows} for the log. Costs a few hundred ms at start-up for a 100M-parameter model."""
    by_shape: dict[tuple[int, int], list[FusedLinear]] = {}
    for projection in projections:
        if projection.packed is not None and projection.weight_t is not None:
            by_shape.setdefault(tuple(projection.weight_t.shape), []).append(projection)
    chosen: dict[tuple[int, int], int] = {}
    for shape, members in by_shape.items():
        sample = members[:per_shape]
        chosen[shape] = FusedLinear.min_packed_rows
        for rows in (2, 1):  # packed from 1 row only where it also won at 2
            x = torch.randn(rows, shape[0], dtype=sample[0].weight_t.dtype)
            times = {}
            for path in ("mm", "packed"):
                best = float("inf")
                for _ in range(sweeps + 1):  # the first sweep warms up
                    start = time.perf_counter()
                    for projection in sample:
                        if path == "mm":
                            torch.mm(x, projection.weight_t)
                        else:
                            torch.ops.mkldnn._linear_pointwise(x, projection.packed, None, "none", [], "")
                    best = min(best, time.perf_counter() - start)
                times[path] = best
            if times["packed"] >= times["mm"]:
                break
            chosen[shape] = rows
        for projection in members:
            projection.min_rows = chosen[shape]
    return chosen


def can_fuse(module: nn.Module) -> bool:
    """Whether `FusedLinear` can take its weight into the fused (in, out) matrix: a float Linear on a CPU."""
    return (isinstance(module, nn.Linear) and module.weight.device.type == "cpu"
            and module.weight.dtype in (torch.float32, torch.bfloat16))


def can_pack(module: nn.Module) -> bool:
    """Whether `FusedLinear` can also pack it for oneDNN: fusable, and oneDNN present."""
    return can_fuse(module) and torch.backends.mkldnn.is_available()


@dataclass
class _LayerProjections:
    """One block's projections as the runner calls them."""

    qkv: FusedLinear  # wq, wk, wv
    wo: FusedLinear
    up: FusedLinear | None  # w1 and w3 (SwiGLU) or w1 (GELU); None for an MoE block, which runs as a module
    down: FusedLinear | None  # w2


class PagedModelRunner:
    """Owns the KV cache tensors; turns a `SchedulerOutput` into sampled token ids (and asked-for logprobs)."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, seed: int = 0, decode_group: int = 8,
                 pack_weights: bool = True, rows_hint: int = 64, tensor_parallel: TensorParallelGroup | None = None,
                 attention_backend: str = "auto"):
        self.model = model
        self.spec = model.spec
        self.tp = tensor_parallel  # set: the model is this rank's shard (`tensor_parallel.shard_model`)
        self.num_kv_heads = local_kv_heads(model)
        self.block_size = block_size
        self.decode_group = decode_group
        self.device = model.tok_embeddings.weight.device
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

        def fused(modules: list[nn.Module]) -> FusedLinear:
            return FusedLinear(modules, rows_hint, pack_weights, tied)

        self.layers: list[_LayerProjections] = []
        for block in model.layers.values():
            attention, ffn = block.attention, block.feed_forward
            dense = isinstance(ffn, FeedForward)
            self.layers.append(_LayerProjections(
                qkv=fused([attention.wq, attention.wk, attention.wv]),
                wo=fused([attention.wo]),
                up=fused([m for m in (ffn.w1, ffn.w3) if m is not None]) if dense else None,
                down=fused([ffn.w2]) if dense else None,
            ))
        self.output = fused([model.output])
        if pack_weights:
            with torch.inference_mode():
                chosen = choose_small_batch_paths(
                    [p for layer in self.layers for p in (layer.qkv, layer.wo, layer.up, layer.down) if p is not None]
                    + [self.output])
            if chosen:
                log.info("packed weights from rows %s", {f"{i}x{o}": rows for (i, o), rows in chosen.items()})
        if self.device.type == "cpu":
            # The Linears FusedLinear laid out are views of its (in, out) matrices already (not contiguous, so
            # skipped); this reaches the rest (MoE experts), instead of copying every weight once more.
            store_weights_transposed(model)
        dtype = model.tok_embeddings.weight.dtype
        shape = (num_blocks, block_size, self.num_kv_heads, self.spec.head_dim)
        # Token slot = block_id * block_size + offset on the flattened first two axes.
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.spec.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.spec.n_layers)]
        self.sampler = Sampler(self.device, seed)
        self.native_attention = native_decode_attention(attention_backend, self.device, dtype)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampleOutput:
        """Compute the scheduled tokens, write their KV, and sample for requests whose chunk reached the end."""
        self.sampler.forget(output.finished_ids)
        items = output.scheduled
        if not items:
            return SampleOutput()
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
        attention = _AttentionPlan(items, self.block_size, device, self.decode_group, self.native_attention)

        x = embed(model, tokens, self.tp)
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings(position_ids)
        rope = None
        if self.spec.position == "rope":
            rope = (model.rope_cos[position_ids].unsqueeze(1), model.rope_sin[position_ids].unsqueeze(1))
        num_tokens, num_kv_heads = len(token_ids), self.num_kv_heads
        for layer, (projections, block) in enumerate(zip(self.layers, model.layers.values())):
            hidden = block.attention_norm(x)
            qkv = projections.qkv(hidden).view(num_tokens, -1, block.attention.head_dim)
            qk, v = qkv[:, :-num_kv_heads], qkv[:, -num_kv_heads:]
            if rope is not None:
                qk = apply_rotary(qk, *rope)  # queries and keys rotated in one call
            q, k = qk[:, :-num_kv_heads], qk[:, -num_kv_heads:]
            self.k_cache[layer].view(-1, *k.shape[1:]).index_copy_(0, slot_ids, k)
            self.v_cache[layer].view(-1, *v.shape[1:]).index_copy_(0, slot_ids, v)
            attended = attention.run(q, self.k_cache[layer], self.v_cache[layer])
            x = x + self._reduce(projections.wo(attended.reshape(num_tokens, -1)))
            hidden = block.ffn_norm(x)
            if projections.up is None or projections.down is None:
                x = x + block.feed_forward(hidden)
            elif block.feed_forward.w3 is None:
                x = x + self._reduce(projections.down(F.gelu(projections.up(hidden), approximate="tanh")))
            else:
                gate, up = projections.up(hidden).chunk(2, dim=-1)
                x = x + self._reduce(projections.down(F.silu(gate) * up))

        return self._sample(x, items)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-split projection's output: the sum over the ranks (itself in one process)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the whole vocabulary (gathered from the ranks when the output head is split)."""
        logits = self.output(self.model.norm(rows))
        if self.tp is not None and self.tp.vocab_range is not None:
            logits = self.tp.gather_last(logits)
        return logits.float()

    def _sample(self, x: torch.Tensor, items: list[ScheduledRequest]) -> SampleOutput:
        """The output head over the rows that sample (and over the prompt rows whose logprobs were asked for)."""
        sample_rows, sampled_items, prompt_rows = [], [], []
        row = 0
        for item in items:
            if item.prompt_targets:
                prompt_rows.append((item, row))
            row += len(item.token_ids)
            if item.sample:
                sample_rows.append(row - 1)
                sampled_items.append(item)
        result = SampleOutput()
        if sampled_items:
            logits = self._logits(x[sample_rows])
            result = self.sampler.sample(logits, sampled_items)
        for item, first in prompt_rows:
            rows = x[first : first + len(item.prompt_targets)]
            logprobs = self._logits(rows).log_softmax(dim=-1)
            entries = token_logprobs(logprobs, item.prompt_targets, item.params.prompt_logprobs or 0)
            result.prompt_logprobs[item.request_id] = (item.start_position + 1, entries)
        return result


def native_decode_attention(backend: str, device: torch.device, dtype: torch.dtype) -> NativeDecodeAttention | None:
    """The native decode-attention kernel for this engine, or None for the torch path.

    `auto` takes the kernel where it applies (a CPU cache in fp32 or bf16) and builds; `native` insists, with a clear
    error where it cannot be had; `torch` never uses it."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r}: expected {', '.join(ATTENTION_BACKENDS[:-1])} or "
                         f"{ATTENTION_BACKENDS[-1]}")
    if backend == "torch":
        return None
    if device.type != "cpu" or dtype not in NativeDecodeAttention.dtypes:
        if backend == "native":
            raise ValueError(f"attention_backend 'native' runs on a CPU cache in fp32 or bf16, not {device.type} "
                             f"{dtype}")
        return None
    library = paged_decode_attention()
    if library is None:
        if backend == "native":
            raise ValueError("attention_backend 'native': the kernel could not be built here (see the log); use "
                             "auto or torch")
        return None
    return NativeDecodeAttention(library)


class NativeDecodeAttention:
    """`kernels/paged_attention.cpp`: every decode of a step in one call, reading the cache in place."""

    dtypes = {torch.float32: 0, torch.bfloat16: 1}

    def __init__(self, library):
        self.function = library.aiinfra_paged_decode_attention

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 rows: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor) -> None:
        """q, out: (tokens, heads, head_dim) with head_dim contiguous; rows: the decode rows (int32); tables: their
        block tables (int32, padded); lengths: their context lengths (int32)."""
        _, heads, head_dim = q.shape
        assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == q.dtype == out.dtype
        status = self.function(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
            rows.data_ptr(), out.data_ptr(), len(rows), heads, k_cache.shape[2], head_dim, k_cache.shape[1],
            tables.shape[1], q.stride(0), out.stride(0), head_dim**-0.5, self.dtypes[q.dtype],
            torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"native paged attention refused its arguments (status {status})")


class _AttentionPlan:
    """Block ids and masks for one step's attention, built once and reused by every layer.

    The cache is (blocks, block_size, kv_heads, head_dim), so a request's keys are a gather of whole blocks
    (block_size * kv_heads * head_dim contiguous values each) rather than of single token rows. With the native
    kernel, all decodes go to it in one call per layer (their block tables and lengths built here, once per step).
    """

    def __init__(self, items: list[ScheduledRequest], block_size: int, device: torch.device, decode_group: int,
                 native: NativeDecodeAttention | None = None):
        self.prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (first row, rows, start position, blocks)
        self.decodes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, block ids, mask)
        self.native = native
        self.native_decodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, tables, lengths
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        row = 0
        for item in items:
            count, start = len(item.token_ids), item.start_position
            if count == 1:
                decode_rows.append(row)
                decode_tables.append(item.block_table[: start // block_size + 1])
                decode_lengths.append(start + 1)
            else:
                blocks = item.block_table[: -(-(start + count) // block_size)]
                self.prefills.append((row, count, start, torch.tensor(blocks, device=device)))
            row += count
        if native is not None and decode_rows:
            widest = max(len(table) for table in decode_tables)
            self.native_decodes = (
                torch.tensor(decode_rows, dtype=torch.int32),
                torch.tensor([table + [0] * (widest - len(table)) for table in decode_tables], dtype=torch.int32),
                torch.tensor(decode_lengths, dtype=torch.int32),
            )
            decode_rows = []
        # Decodes go in groups so that a group's gathered keys and values are still in cache for its attention
        # (measured 18 instead of 24 ms per step at batch 32 against one call for all; groups of 2 to 16 tie).
        for first in range(0, len(decode_rows), decode_group):
            tables = decode_tables[first : first + decode_group]
            widest = max(len(table) for table in tables)
            # Padding points at block 0, a real block; the mask keeps it out of the softmax.
            block_ids = torch.tensor([table + [0] * (widest - len(table)) for table in tables], device=device)
            lengths = torch.tensor(decode_lengths[first : first + decode_group], device=device)
            # (batch, 1 head, 1 query, keys): True where the key is part of that request's context.
            mask = (torch.arange(widest * block_size, device=device) < lengths[:, None])[:, None, None, :]
            rows = torch.tensor(decode_rows[first : first + decode_group], device=device)
            self.decodes.append((rows, block_ids.reshape(-1), mask))

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: (tokens, heads, head_dim); caches: (blocks, block_size, kv_heads, head_dim) -> like q."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if self.native_decodes is not None:
            self.native(q, k_cache, v_cache, out, *self.native_decodes)
        gqa = q.shape[1] != k_cache.shape[2]
        kv_shape = k_cache.shape[2:]
        for rows, block_ids, mask in self.decodes:
            query = q[rows].unsqueeze(2)  # (batch, heads, 1, head_dim)
            shape = (len(rows), -1, *kv_shape)
            keys = k_cache.index_select(0, block_ids).view(shape).transpose(1, 2)  # (batch, kv_heads, keys, dim)
            values = v_cache.index_select(0, block_ids).view(shape).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa)
            out[rows] = attended.squeeze(2)
        for first, count, start, block_ids in self.prefills:
            query = q[first : first + count].transpose(0, 1).unsqueeze(0)
            length = start + count
            keys = k_cache.index_select(0, block_ids).view(-1, *kv_shape)[:length].transpose(0, 1).unsqueeze(0)
            values = v_cache.index_select(0, block_ids).view(-1, *kv_shape)[:length].transpose(0, 1).unsqueeze(0)
            if start == 0:
                attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                # Query i sits at position start + i and sees every key up to there.
                key_positions = torch.arange(length, device=q.device)
                query_positions = torch.arange(start, length, device=q.device)
                mask = key_positions[None, :] <= query_positions[:, None]
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa)
            out[first : first + count] = attended[0].transpose(0, 1)
        return out
