"""The edge profile of `aiinfra serve`: int8 weights, one thread, one process, and a memory budget it keeps to.

The budget (`--memory-mb`) covers the whole server process: the interpreter, torch and the HTTP stack, the int8
weights, one engine step's working memory, and the KV cache, which gets what is left. The first three are measured
(the resident set once the weights are loaded and quantized, with the server's libraries imported), the step's
working memory is bounded from the model's shapes, and the KV cache is sized last. The int8 weights are counted
from the model's shapes before any weight is read, so a model that cannot fit is refused before it is loaded.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.loading import ServedModel, load_model
from aiinfra.serve.quantize import quantize_int8, weight_bytes
from aiinfra.serve.runner import kv_bytes_per_token
from aiinfra.spec import ModelSpec

MIB = 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """How the edge server spends its budget, in bytes."""

    budget_bytes: int
    resident_bytes: int
    """the process once loaded: interpreter, libraries, int8 weights"""
    weight_bytes: int
    activation_bytes: int
    kv_cache_bytes: int

    def describe(self) -> str:
        return (
            f"memory budget {self.budget_bytes / MIB:.0f} MiB: {self.resident_bytes / MIB:.0f} MiB resident once "
            f"loaded ({self.weight_bytes / MIB:.1f} MiB of int8 weights), {self.activation_bytes / MIB:.0f} MiB for a "
            f"step's activations, {self.kv_cache_bytes / MIB:.0f} MiB of KV cache"
        )


def process_resident_bytes() -> int:
    """This process's resident set now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(spec: ModelSpec, max_num_batched_tokens: int) -> int:
    """A bound on one engine step's working memory: per token, fp32 hidden states and attention projections
    (4 x dim), the MLP's intermediates (3 x ffn_dim) and the logits (vocab), twice over for a kernel's input and
    output alive at once."""
    per_token_floats = 4 * spec.dim + 3 * spec.ffn_dim + spec.vocab_size
    return 2 * max_num_batched_tokens * per_token_floats * 4


def int8_weight_bytes(model_path: Path, dtype: str) -> tuple[ServedModel, int]:
    """The model without its weights (meta device) and the bytes its weights take once int8-quantized."""
    served = load_model(model_path, weights=False, dtype=dtype)
    quantize_int8(served.model)
    unique = {id(t): t for t in [*served.model.parameters(), *(b for _, b in served.model.named_buffers())]}
    return served, sum(t.numel() * t.element_size() for t in unique.values())


def plan_memory(
    budget_bytes: int, resident_bytes: int, weight_bytes: int, step_bytes: int, min_kv_bytes: int
) -> MemoryPlan:
    """Give the KV cache what the budget leaves; a ValueError naming --memory-mb when the weights alone do not fit,
    or when what is left is under `min_kv_bytes` (the blocks of one full-context request)."""
    budget_mb = budget_bytes / MIB
    if weight_bytes >= budget_bytes:
        raise ValueError(
            f"--memory-mb {budget_mb:g}: the int8 weights alone take {weight_bytes / MIB:.1f} MiB; the model does "
            "not fit this budget"
        )
    left = budget_bytes - resident_bytes - step_bytes
    if left < min_kv_bytes:
        needed = (resident_bytes + step_bytes + min_kv_bytes) / MIB
        raise ValueError(
            f"--memory-mb {budget_mb:g}: the server holds {resident_bytes / MIB:.0f} MiB once loaded (interpreter, "
            f"libraries, {weight_bytes / MIB:.1f} MiB of int8 weights) and a step needs {step_bytes / MIB:.0f} MiB: "
            f"{max(left, 0) / MIB:.1f} MiB are left for the KV cache, under the {min_kv_bytes / MIB:.1f} MiB of one "
            f"full-context request (at least {needed:.0f} MiB needed)"
        )
    return MemoryPlan(budget_bytes, resident_bytes, weight_bytes, step_bytes, left)


def load_edge_engine(
    model_path: Path, memory_mb: float, engine_config: EngineConfig, dtype: str = "auto"
) -> tuple[ServedModel, LLMEngine, MemoryPlan]:
    """Load MODEL for the edge profile: one thread, int8 weights, the KV cache sized from `memory_mb`.

    `engine_config` gives the batch limits and block size; its KV budget and weight packing are replaced (packed
    copies would double the weights' memory)."""
    import uvicorn  # noqa: F401  (the HTTP stack is part of what the budget must hold: in the measured resident set)

    import aiinfra.serve.api  # noqa: F401

    torch.set_num_threads(1)
    budget_bytes = int(memory_mb * MIB)
    meta, expected_weight_bytes = int8_weight_bytes(model_path, dtype)
    step_bytes = activation_bytes(meta.model.spec, engine_config.max_num_batched_tokens)
    if expected_weight_bytes >= budget_bytes:  # refused before a weight is read
        plan_memory(budget_bytes, 0, expected_weight_bytes, step_bytes, 0)
    served = load_model(model_path, dtype=dtype)
    quantize_int8(served.model)
    gc.collect()
    bytes_per_block = kv_bytes_per_token(served.model, served.model.tok_embeddings.weight.dtype)
    bytes_per_block *= engine_config.block_size
    full_context_blocks = -(-served.model.spec.max_seq_len // engine_config.block_size)
    plan = plan_memory(
        budget_bytes,
        process_resident_bytes(),
        weight_bytes(served.model),
        step_bytes,
        full_context_blocks * bytes_per_block,
    )
    config = engine_config.model_copy(
        update={"kv_cache_memory_bytes": plan.kv_cache_bytes, "num_blocks": None, "pack_weights": False}
    )
    return served, LLMEngine(served.model, config, served.eos_token_id), plan
