"""The planner's predicted step time for a training config, to draw beside the measured one.

On a CUDA device in the hardware catalog the prediction is the planner's own (`plan.from_config` with the GEMM
ceilings fitted on published runs). On a CPU it is the planner's step model on a self-calibrated profile
(`plan.calibration`): the measured matmul peak the trainer computes MFU against, and a copy bandwidth measured
here. The gloo all-reduce bandwidth of a multi-process CPU run is not measured at start-up (it would cost a
benchmark); it is taken as half the copy bandwidth with 50 us per ring step, and the source string says so.
"""

from __future__ import annotations

import os
import time

import torch

from aiinfra.config import Config
from aiinfra.hardware import match_device_name
from aiinfra.plan.calibrated import calibrated
from aiinfra.plan.calibration import CpuProfile, cpu_cluster
from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.from_config import configured_run
from aiinfra.plan.step import step_breakdown


def copy_bandwidth_bytes_per_s(size_bytes: int = 64 * 2**20, repeats: int = 3) -> float:
    """Best rate of copying one fp32 tensor into another (read + write bytes counted)."""
    source = torch.ones(size_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def predicted_step_time(config: Config, device: torch.device, peak_flops_per_s: float) -> tuple[float | None, str]:
    """(seconds, where the figure comes from) of one step of `config`; (None, why) when the planner cannot say."""
    run = configured_run(config)
    try:
        if device.type == "cuda":
            accelerator = match_device_name(torch.cuda.get_device_name(device))
            if accelerator is None:
                return None, f"no prediction: {torch.cuda.get_device_name(device)} is not in the hardware catalog"
            cluster = calibrated(make_cluster(accelerator.id, run.n_devices))
            source = f"planner: {accelerator.id} x {run.n_devices}, fitted GEMM ceilings"
        else:
            copy_bw = copy_bandwidth_bytes_per_s()
            profile = CpuProfile(
                matmul_flops_per_s=peak_flops_per_s * run.n_devices,  # cpu_cluster gives each process 1/n
                memory_bw_bytes_per_s=copy_bw,
                allreduce_bus_bw_bytes_per_s=copy_bw / 2,
                allreduce_latency_s=50e-6,
                memory_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                cores=os.cpu_count() or 1,
            )
            cluster = cpu_cluster(profile, run.n_devices)
            source = "planner on this CPU: measured matmul peak and copy bandwidth"
            if run.n_devices > 1:
                source += "; all-reduce assumed (copy bandwidth / 2, 50 us per ring step)"
        return step_breakdown(run.spec, run.settings, run.layout, cluster).step_time_s, source
    except (PlanError, ValueError, KeyError) as error:
        return None, f"no prediction: {error}"
