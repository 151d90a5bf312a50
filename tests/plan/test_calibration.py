"""The CPU device profile for self-calibration, with hand values (the measured comparison is wired later)."""

import pytest

from aiinfra.plan.calibration import CpuProfile, cpu_cluster, predict_trainer_step
from aiinfra.plan.cluster import collective_time_s
from aiinfra.spec import preset

PROFILE = CpuProfile(matmul_flops_per_s=100e9, memory_bw_bytes_per_s=10e9, allreduce_bus_bw_bytes_per_s=2e9,
                     allreduce_latency_s=50e-6, memory_bytes=8e9, cores=2)


def test_processes_share_the_measured_peaks() -> None:
    cluster = cpu_cluster(PROFILE, 2)
    assert cluster.peak_flops("fp32") == pytest.approx(50e9)
    assert cluster.memory_bw_bytes_per_s == pytest.approx(5e9)
    assert cluster.efficiency.gemm_efficiency(1e6, 1e6, 1e6) == pytest.approx(1.0, rel=1e-4)


def test_two_process_all_reduce_by_hand() -> None:
    cluster = cpu_cluster(PROFILE, 2)
    # 2 x ((n-1)/n x S / bw + (n-1) alpha) with n = 2, S = 4 MB
    assert collective_time_s(cluster, "all_reduce", 4e6, 2) == pytest.approx(2 * (0.5 * 4e6 / 2e9 + 50e-6))


def test_ddp_splits_the_batch_and_adds_the_gradient_all_reduce() -> None:
    spec = preset("tiny")
    single = predict_trainer_step(spec, PROFILE, 256, 16)
    ddp = predict_trainer_step(spec, PROFILE, 256, 16, n_processes=2)
    # Each process computes half the batch at half the peak: the same compute time.
    assert ddp.compute_s == pytest.approx(single.compute_s)
    # fp32 Adam on CPU touches 4 + 4 + 2 x 8 = 24 bytes per parameter at the measured bandwidth.
    assert single.optimizer_s == pytest.approx(spec.num_params() * 24 / 10e9)
    assert ddp.dp_comm_s > 0
    fsdp = predict_trainer_step(spec, PROFILE, 256, 16, n_processes=2, sharding="fsdp")
    assert fsdp.optimizer_s == pytest.approx(single.optimizer_s)  # half the parameters at half the bandwidth
