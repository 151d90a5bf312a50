"""`parallelize(model, mesh, config)`: tensor parallel, activation checkpointing, compile, then FSDP2 or DDP.

The order is fixed (torchtitan's): TP rewrites the Linear weights into DTensors sharded over the 'tp' axis;
checkpointing and compile wrap each block; FSDP then shards what is left (TP-sharded DTensors included) over
'dp_shard', or DDP replicates the whole model over 'dp_replicate'.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from aiinfra.config import Config
from aiinfra.distributed.materialize import SafetensorsWeights, is_meta, materialize

# Selective checkpointing keeps the outputs of these (the expensive ops) and recomputes the cheap ones around
# them (norms, activations, rotary, residual adds): most of the memory saving of full recomputation for a
# fraction of its extra FLOPs (Korthikanti et al. 2022).
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def parallelize(model: nn.Module, mesh: DeviceMesh | None, config: Config, device: torch.device) -> nn.Module:
    """Apply the layout of `config.parallel` to `model` (in place where the APIs allow); return the module to run.

    `mesh` is None for a single process: only checkpointing and compile apply then. A pipeline stage is a
    `Transformer` with some parts set to None, and is parallelized the same way. A model built on the meta device
    is materialised on `device` (this rank's shards only, initialised from train.seed) once sharded, before DDP,
    which broadcasts real parameters.
    """
    par = config.parallel
    if mesh is not None and par.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if par.activation_checkpoint != "none":
        apply_activation_checkpointing(model, par.activation_checkpoint)
    if config.train.compile:
        # Per block, as torchtitan: blocks are identical, so one compiled graph serves them all.
        for block in model.layers.values():
            block.compile()
    # FSDP on a single rank shards nothing but still brings its mixed-precision policy (bf16 parameters).
    use_fsdp = mesh is not None and (par.dp_shard > 1 or par.mixed_precision == "fsdp")
    if use_fsdp:
        apply_fsdp(model, mesh, config)
    if is_meta(model):
        # Offloaded FSDP shards live in CPU memory; FSDP moves them to the device for each gather.
        weights = SafetensorsWeights(config.train.init_from) if config.train.init_from else None
        materialize(model, torch.device("cpu") if par.cpu_offload else device, config.train.seed, weights)
    if mesh is None or use_fsdp:
        return model
    if par.dp_replicate > 1:
        return DistributedDataParallel(model, process_group=mesh["dp_replicate"].get_group())
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallel: column-split q/k/v/w1/w3, row-split wo/w2, norms over sequence.

    Between blocks the residual stream is sharded along the sequence (Shard(1)): the norms run on a slice of the
    tokens, and the all-reduce of row-parallel outputs becomes a reduce-scatter plus an all-gather.
    """
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.output is not None:
        top_plan["norm"] = SequenceParallel()
        # Gathered logits on every rank: the loss code stays that of one process.
        top_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True)
    parallelize_module(model, tp_mesh, top_plan)
    if model.tok_embeddings is not None and model.spec.tie_embeddings:
        # Both weights are (vocab, dim) split along the vocabulary: re-tie the DTensor that replaced the original.
        model.output.weight = model.tok_embeddings.weight
    block_plan = {
        "attention_norm": SequenceParallel(),
        # The stage input may arrive as a plain tensor (from embeddings or a pipeline neighbour): say what it is,
        # and hand the block back plain tensors so that residual adds never mix DTensor and Tensor.
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), use_local_output=True
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in model.layers.values():
        plan = dict(block_plan)
        if block.feed_forward.w3 is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """'full' recomputes each block in backward; 'selective' keeps the matmul and attention outputs."""
    for block in model.layers.values():
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, config: Config) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, output); HSDP when dp_replicate > 1 as well."""
    par = config.parallel
    dp_mesh = mesh["dp_replicate", "dp_shard"] if par.dp_replicate > 1 else mesh["dp_shard"]
    options = {"mesh": dp_mesh, "reshard_after_forward": par.reshard_after_forward}
    if par.mixed_precision == "fsdp" and config.train.dtype == "bf16":
        # bf16 parameters gathered and computed with; gradients reduced in fp32 into fp32 master weights.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if par.cpu_offload:
        # pin_memory needs an accelerator; the CPU build refuses it.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **options)
    fully_shard(model, **options)
