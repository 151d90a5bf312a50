"""Self-calibration on the machine at hand: a device profile of the local CPU built from measurements.

The planner's GPU model needs datasheet peaks and per-generation efficiencies; on a CPU we measure them instead:
the peak of a large fp32 matmul (FLOP/s), the memory bandwidth of a large copy (bytes/s), and the bus bandwidth and
per-step latency of a gloo all-reduce between local processes (what `aiinfra bench comm` reports). Because the
matmul figure is already what a large matmul achieves, the GEMM ceiling is 1.0 and only the size dependence remains.
The trainer (fp32 on CPU, AdamW) is then predicted by the same step model as every cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiinfra.hardware import Accelerator
from aiinfra.plan.cluster import Cluster
from aiinfra.plan.efficiency import EfficiencyProfile
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.step import StepBreakdown, step_breakdown
from aiinfra.spec import ModelSpec


@dataclass(frozen=True)
class CpuProfile:
    """Measured figures of the local machine; every field is a measurement, not a datasheet value."""

    matmul_flops_per_s: float  # large fp32 matmul, all cores of one process
    memory_bw_bytes_per_s: float  # large tensor copy (read + write counted)
    allreduce_bus_bw_bytes_per_s: float  # gloo all-reduce bus bandwidth between local processes
    allreduce_latency_s: float  # per ring step, from the smallest all-reduce size
    memory_bytes: float
    cores: int
    gemm_half_dim: float = 32.0  # CPU BLAS kernels saturate at small sizes; replace by a measured sweep
    attention_efficiency: float = 0.5  # scaled_dot_product_attention's CPU kernel vs the matmul peak


def cpu_cluster(profile: CpuProfile, n_processes: int = 1) -> Cluster:
    """A Cluster of `n_processes` trainer processes sharing the local CPU.

    Processes split the cores, so each gets 1/n of the measured matmul peak and of the memory bandwidth; they talk
    through gloo over shared memory, which is the scale-up domain here.
    """
    share = 1.0 / n_processes
    accelerator = Accelerator(
        id="cpu-local", kind="cpu",
        bf16_dense_tflops=profile.matmul_flops_per_s * share / 1e12,  # fp32 on CPU; the column holds the peak
        fp8_dense_tflops=None, int8_dense_tops=None,
        memory_gb=profile.memory_bytes * share / 1e9,
        memory_bw_gbs=profile.memory_bw_bytes_per_s * share / 1e9,
        scaleup_domain=n_processes,
        scaleup_bw_gbs_per_dir=profile.allreduce_bus_bw_bytes_per_s / 1e9,
        scaleout_gbps_per_device=None, tdp_w=None,
        sources="measured on this machine",
    )
    efficiency = EfficiencyProfile(
        generation="cpu-local", accelerators=("cpu-local",),
        gemm_efficiency_max=1.0, gemm_half_dim=profile.gemm_half_dim, fp8_gemm_efficiency_max=None,
        attention_efficiency=profile.attention_efficiency,
        memory_bw_efficiency=1.0, collective_bw_efficiency=1.0,
        scaleup_latency_s=profile.allreduce_latency_s, scaleout_latency_s=profile.allreduce_latency_s,
        basis="measured",
    )
    return Cluster(accelerator=accelerator, n_devices=n_processes, efficiency=efficiency,
                   scaleup_domain=n_processes,
                   scaleup_bw_bytes_per_s=profile.allreduce_bus_bw_bytes_per_s,
                   scaleout_bw_bytes_per_s=profile.allreduce_bus_bw_bytes_per_s)


def trainer_settings(seq_len: int, global_batch_seqs: int) -> TrainSettings:
    """aiinfra's CPU trainer: fp32 weights and gradients, AdamW's two fp32 moments, no dropout, SDPA attention."""
    return TrainSettings(seq_len=seq_len, global_batch_seqs=global_batch_seqs, precision="fp32",
                         attention_kernel="flash", dropout=False, param_bytes=4, grad_bytes=4,
                         grad_reduce_bytes=4, optimizer_bytes_per_param=8, dp_overlap=True)


def predict_trainer_step(spec: ModelSpec, profile: CpuProfile, seq_len: int, global_batch_seqs: int,
                         n_processes: int = 1, sharding: str = "ddp", micro_batch: int | None = None) -> StepBreakdown:
    """Predicted step of our own trainer: one process, or n processes under DDP ('ddp') or FSDP ('fsdp')."""
    fsdp = sharding == "fsdp"
    layout = Layout(dp_replicate=1 if fsdp else n_processes, dp_shard=n_processes if fsdp else 1,
                    zero_stage=3 if fsdp else 0,
                    micro_batch=micro_batch or global_batch_seqs // n_processes)
    return step_breakdown(spec, trainer_settings(seq_len, global_batch_seqs), layout, cpu_cluster(profile, n_processes))
