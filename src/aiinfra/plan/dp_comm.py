"""Data-parallel communication of one training step: gradient reduction and parameter gathers under plain data
parallelism, ZeRO-1/2/3, FSDP and HSDP, bucketed, and how much of it the forward and backward passes hide."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiinfra.plan.cluster import Cluster, collective_time_s
from aiinfra.plan.eager import fsdp1_grad_copy_bytes, fsdp_copy_out_s
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import device_param_counts
from aiinfra.spec import ModelSpec

if TYPE_CHECKING:
    from aiinfra.plan.step import MicroBatchTimes

# A collective that overlaps computation still runs kernels on the same chip: NCCL gives each channel one thread
# block, and its default of up to 32 channels over NVLink occupies about a quarter of an A100's 108 or an H100's
# 132 SMs (NCCL environment docs, NCCL_MAX_NCHANNELS). Overlapped time therefore slows the computation it hides
# behind by this fraction.
OVERLAP_SM_TAX = 0.25


def overlapped_s(comm_s: float, compute_s: float) -> float:
    """Time a collective adds when it runs concurrently with `compute_s` of work: the excess plus the SM tax."""
    return max(0.0, comm_s - compute_s) + OVERLAP_SM_TAX * min(comm_s, compute_s)


def zero3_overlapped_s(gather: float, backward_gather: float, scatter: float, calls: float, forward_window: float,
                       backward_window: float) -> float:
    """Exposed ZeRO-3/FSDP time of one micro-batch. The first unit's all-gather has no earlier compute to hide
    behind, nor the last unit's reduce-scatter in the backward later compute ("the first block during forward pass
    and the last block during backward pass are not able to overlap": IBM and Meta, "Maximizing training throughput
    using PyTorch FSDP", PyTorch blog 2024-03-13, appendix); the rest prefetches behind the passes."""
    first, last = gather / calls, scatter / calls
    return (first + overlapped_s(gather - first, forward_window)
            + overlapped_s(backward_gather + scatter - last, backward_window) + last)


def dp_collective_calls(params: float, stage_layers: int, bucket_params: float) -> float:
    """Collectives per pass over a stage's parameters: one per bucket, or one per layer (FSDP's wrapped units)."""
    if bucket_params > 0:
        return max(1.0, params / bucket_params)
    return float(max(1, stage_layers))


def dp_bucket_params(settings: TrainSettings, layout: Layout) -> float:
    """Parameters per ZeRO-0/1/2 bucket: Megatron-LM sizes them max(40M, 1M x dp x cp) when --ddp-bucket-size is
    not given (megatron/training/training.py), so that each rank's share of a bucket stays large at scale."""
    if settings.dp_bucket_params <= 0:
        return 0.0
    return max(settings.dp_bucket_params, settings.dp_bucket_params_per_rank * layout.dp * layout.cp)


def dp_comm_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster, mb: MicroBatchTimes,
               stage_layers: int, m: int) -> float:
    """Exposed data-parallel time: gradient reduction, parameter gathers, and how much the passes hide.

    ZeRO shards over dp_shard x cp (Megatron shards its distributed optimizer over dp x cp); HSDP's dp_replicate
    replicas then all-reduce the gradient shards. Each collective is split into buckets and pays its ring latency
    per bucket (`collective_time_s`), so the same bytes cost more on more ranks when the buckets are small.
    """
    if layout.dp * layout.cp == 1:
        return 0.0
    params = device_param_counts(spec, layout).total
    grads = params * settings.grad_reduce_bytes
    weights = params * (1 if settings.fp8_param_gather else settings.gathered_bytes)
    bucket = settings.zero3_bucket_params if layout.zero_stage == 3 else dp_bucket_params(settings, layout)
    calls = dp_collective_calls(params, stage_layers, bucket)
    backward_window = mb.backward_s * stage_layers
    forward_window = (mb.compute_s - mb.backward_s) * stage_layers
    if layout.zero_stage == 0:
        # Plain data parallel over every replica: one bucketed all-reduce of the gradients per step (Li et al. 2020).
        reduce = collective_time_s(cluster, "all_reduce", grads, layout.dp * layout.cp, layout.tp, calls)
        return overlapped_s(reduce, backward_window) if settings.dp_overlap else reduce
    shard_group = layout.dp_shard * layout.cp
    replicate = collective_time_s(cluster, "all_reduce", grads / shard_group, layout.dp_replicate,
                                  layout.tp * shard_group, calls)
    gather = collective_time_s(cluster, "all_gather", weights, shard_group, layout.tp, calls)
    scatter = collective_time_s(cluster, "reduce_scatter", grads, shard_group, layout.tp, calls)
    if layout.zero_stage == 3:
        # FSDP gathers the weights for the forward (and again for the backward when it reshards after the forward)
        # and reduce-scatters gradients every micro-batch, prefetching so that each collective hides behind the
        # neighbouring layer's compute (Zhao et al. 2023, PyTorch FSDP, 3.4; Rajbhandari et al. 2020, ZeRO-3).
        backward_gather = gather if settings.reshard_after_forward else 0.0
        bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
        copy_out = 0.0
        if settings.fsdp_copy_out:
            copy_out = m * fsdp_copy_out_s(weights, 2 if settings.reshard_after_forward else 1, bandwidth)
        if settings.fsdp_flat_grad:
            copy_out += m * fsdp1_grad_copy_bytes(params, settings.gathered_bytes, settings.grad_reduce_bytes) \
                / bandwidth
        if not settings.dp_overlap:
            return m * (gather + backward_gather + scatter) + replicate + copy_out
        return m * zero3_overlapped_s(gather, backward_gather, scatter, calls, forward_window, backward_window) \
            + overlapped_s(replicate, backward_window) + copy_out
    # ZeRO-1/2 (Megatron's distributed optimizer, DeepSpeed stages 1-2): reduce-scatter gradients (after the last
    # micro-batch, or after every one), all-gather the updated weights once per step.
    scatters = m if settings.grad_reduce_every_micro_batch else 1
    if not settings.dp_overlap:
        return scatters * scatter + replicate + gather
    # Gradients are final only in the last micro-batch's backward, which is all the reduction can hide behind
    # (bucketed overlap, Li et al. 2020, PyTorch DDP); the weight gather hides behind the first forward.
    return (scatters * overlapped_s(scatter, backward_window) + overlapped_s(replicate, backward_window)
            + overlapped_s(gather, forward_window))
