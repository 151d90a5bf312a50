"""The cluster: devices, their peaks, the scale-up domain and the scale-out network, and collective costs on them.

Collective times use the alpha-beta model of ring algorithms (Thakur, Rabenseifner and Gropp 2005; the NCCL
tests' "bus bandwidth" convention): an all-gather or reduce-scatter over n ranks moves (n-1)/n of the full
buffer through each rank's link in n-1 steps; an all-reduce is a reduce-scatter plus an all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from aiinfra.hardware import Accelerator, get_accelerator
from aiinfra.plan.efficiency import EfficiencyProfile, profile_for
from aiinfra.plan.errors import PlanError

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"]
# Share of device memory a plan may fill, for search and validation alike. On GPUs the rest goes to the CUDA context
# (~0.5 GiB) and NCCL's buffers (~1 GiB); frameworks that allocate gradients and parameters in contiguous buffers
# (Megatron, FSDP2) lose little to fragmentation. The bound is set by a layout that really ran: Korthikanti et al.
# 2022's 1T model (TP8 PP64, interleaved, selective recompute with SP) needs 95.0% of an 80 GiB A100 by the paper's
# own activation count (the memory check reproduces its Table 2 within 0.3%), so the headroom is below 5%: 4%.
# XLA on TPUs assigns buffers statically before the run, so only its own small reserve is lost.
USABLE_MEMORY_FRACTION = 0.96
USABLE_MEMORY_FRACTION_TPU = 0.97
# Accelerators whose scale-up domain is a full mesh of point-to-point links, with no switch between them: "each AMD
# Instinct MI300X system GPU is connected to its seven peer GPUs via xGMI links, forming a fully connected mesh"
# (AMD ROCm blog, "Understanding RCCL Bandwidth and xGMI Performance on AMD Instinct MI300X", March 2025); MI325X
# boards are the same platform, and MI350 Series boards join their eight GPUs by seven Infinity Fabric links each the
# same way.
MESH_ACCELERATORS = frozenset({"mi300x", "mi325x", "mi350x", "mi355x"})


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster of `n_devices` accelerators and the links between them."""

    accelerator: Accelerator
    n_devices: int
    efficiency: EfficiencyProfile
    scaleup_domain: int  # devices joined by the fast fabric (NVLink node, NVL72 rack, TPU slice)
    scaleup_bw_bytes_per_s: float  # per device, per direction
    scaleout_bw_bytes_per_s: float  # per device, per direction (NIC or data-centre network)
    topology: Literal["switch", "torus", "mesh"] = "switch"

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes (the catalog's GB are GiB, as on the vendors' HBM parts)."""
        return self.accelerator.memory_bytes

    @property
    def usable_memory_bytes(self) -> float:
        """What a training plan may fill (one rule for search and validation): a fixed share of the memory."""
        fraction = USABLE_MEMORY_FRACTION_TPU if self.accelerator.kind == "tpu" else USABLE_MEMORY_FRACTION
        return fraction * self.memory_bytes

    @property
    def memory_bw_bytes_per_s(self) -> float:
        return self.accelerator.memory_bw_gbs * 1e9

    def peak_flops(self, precision: str) -> float:
        """Dense peak in FLOP/s for a training or serving precision (fp16 and bf16 share a peak)."""
        dtype = "bf16" if precision in ("bf16", "fp16", "fp32") else precision
        try:
            return self.accelerator.peak_flops(dtype)
        except ValueError as error:
            raise PlanError(str(error)) from None


def make_cluster(
    hardware: str | Accelerator,
    n_devices: int,
    scaleup_domain: int | None = None,
    scaleout_gbps_per_device: float | None = None,
    extra_csv: Path | None = None,
) -> Cluster:
    """A cluster of `n_devices` catalog accelerators, with optional overrides of the topology figures."""
    if n_devices < 1:
        raise PlanError(f"--devices={n_devices}: must be >= 1")
    if isinstance(hardware, str):
        try:
            accelerator = get_accelerator(hardware, extra_csv)
        except KeyError as error:
            raise PlanError(error.args[0]) from None
    else:
        accelerator = hardware
    domain = scaleup_domain or accelerator.scaleup_domain
    scaleup_gbs = accelerator.scaleup_bw_gbs_per_dir
    # A device without a scale-up fabric talks to its peers over the scale-out network only.
    scaleout_gbps = scaleout_gbps_per_device or accelerator.scaleout_gbps_per_device or 0.0
    scaleout_bytes = scaleout_gbps * 1e9 / 8
    return Cluster(
        accelerator=accelerator,
        n_devices=n_devices,
        efficiency=profile_for(accelerator.id, accelerator.kind),
        scaleup_domain=max(1, domain),
        scaleup_bw_bytes_per_s=(scaleup_gbs or 0.0) * 1e9 or scaleout_bytes,
        scaleout_bw_bytes_per_s=scaleout_bytes or (scaleup_gbs or 0.0) * 1e9,
        topology="torus" if accelerator.kind == "tpu" else "mesh" if accelerator.id in MESH_ACCELERATORS else "switch",
    )


def with_efficiency(cluster: Cluster, efficiency: EfficiencyProfile) -> Cluster:
    """The same cluster with another efficiency profile (used by calibration and sensitivity studies)."""
    return replace(cluster, efficiency=efficiency)


def group_bandwidth_bytes_per_s(cluster: Cluster, group_size: int, stride: int) -> tuple[float, float]:
    """Bus bandwidth and per-step latency for a group of `group_size` ranks spaced `stride` ranks apart.

    Ranks are packed into scale-up domains in order, so a group stays on the fast fabric when
    stride x size <= domain. A group that spans domains with k members in each is limited by the scale-out
    links; NCCL runs one ring per NIC, so each domain pushes its share through k NICs at once (k x NIC rate),
    but never faster than the scale-up fabric.
    """
    eff = cluster.efficiency
    if group_size <= 1:
        return float("inf"), 0.0
    if stride * group_size <= cluster.scaleup_domain:
        # A TPU's figure is already the sum over all its ICI links, one way (Cloud TPU docs: v5p 1200 GB/s
        # bidirectional per chip = 6 links x 100 GB/s each way): a bidirectional ring on each torus axis, V / (2 W)
        # per axis (jax-ml scaling book, "How to think about TPUs"), can at most fill every link, so nothing is
        # doubled (doubling made v5p send 1200 GB/s one way).
        bandwidth = cluster.scaleup_bw_bytes_per_s
        return bandwidth * eff.collective_bw_efficiency, eff.scaleup_latency_s
    members_per_domain = max(1, cluster.scaleup_domain // stride) if stride < cluster.scaleup_domain else 1
    bandwidth = min(cluster.scaleup_bw_bytes_per_s, members_per_domain * cluster.scaleout_bw_bytes_per_s)
    return bandwidth * eff.collective_bw_efficiency, eff.scaleout_latency_s


def collective_time_s(cluster: Cluster, kind: Collective, size_bytes: float, group_size: int, stride: int = 1,
                      n_calls: float = 1.0, remote_share: float = 1.0) -> float:
    """Time of a collective over `size_bytes` (the full, unsharded buffer) on a group of ranks, split in `n_calls`.

    all_gather / reduce_scatter: (n-1)/n x size / bw + (n-1) alpha; all_reduce: twice that;
    all_to_all: (n-1)/n x size / bw + (n-1) alpha (each rank keeps 1/n and sends the rest);
    p2p: size / bw + alpha (one send). A buffer sent in `n_calls` buckets pays the latency term once per bucket,
    which is what makes many small collectives over many ranks latency-bound (each ring step waits on the slowest
    link of the ring). `remote_share` scales the off-domain bytes of an all-to-all (node-limited MoE dispatch sends
    fewer copies over the network than it delivers).
    """
    if group_size <= 1 or size_bytes <= 0:
        return 0.0
    bandwidth, latency = group_bandwidth_bytes_per_s(cluster, group_size, stride)
    n = group_size
    calls = max(1.0, n_calls)
    if kind == "all_to_all" and stride * group_size > cluster.scaleup_domain:
        # Across domains every rank sends the off-domain share of its buffer through its own NIC while the
        # on-domain share crosses the fast fabric (DeepEP's split of NVLink and RDMA traffic, DeepSeek-V3 3.2.2).
        eff = cluster.efficiency
        local = max(1, min(group_size, cluster.scaleup_domain // max(1, stride)))
        remote_s = remote_share * (group_size - local) / group_size * size_bytes / (cluster.scaleout_bw_bytes_per_s
                                                                     * eff.collective_bw_efficiency)
        local_s = (local - 1) / group_size * size_bytes / (cluster.scaleup_bw_bytes_per_s
                                                           * eff.collective_bw_efficiency)
        return max(remote_s, local_s) + calls * eff.scaleout_latency_s
    if kind == "p2p":
        return size_bytes / bandwidth + calls * latency
    steps = n - 1
    if cluster.topology == "switch" and stride * n <= cluster.scaleup_domain and kind == "all_reduce":
        # Over an NVSwitch fabric small all-reduces run in two latency steps, not n - 1: in-switch reduction (NCCL
        # NVLS) or the one-/two-shot kernels of TensorRT-LLM and vLLM; large ones are bandwidth-bound either way.
        steps = min(steps, 1)
    if cluster.topology == "torus" and stride * n <= cluster.scaleup_domain and n > 16:
        # Over a 3D torus the collective runs one ring per axis in turn: about 3 (n^(1/3) - 1) latency steps.
        steps = 3 * (round(n ** (1 / 3)) - 1)
    one_pass = (n - 1) / n * size_bytes / bandwidth + calls * steps * latency
    if cluster.topology == "mesh" and stride * n <= cluster.scaleup_domain and kind == "all_reduce":
        return min(2 * one_pass, mesh_one_shot_all_reduce_s(cluster, size_bytes, calls))
    return 2 * one_pass if kind == "all_reduce" else one_pass


def mesh_one_shot_all_reduce_s(cluster: Cluster, size_bytes: float, n_calls: float = 1.0) -> float:
    """A one-shot all-reduce over a full mesh: every rank reads each peer's whole buffer over the one link to it
    and sums them, in two latency steps (post, then wait on the flags), but the whole buffer crosses every link.

    Over a mesh a ring moves 2 (n-1)/n of the buffer over all n-1 links at once in 2 (n-1) steps, so the one-shot
    wins for small buffers only; RCCL's measured curve on 8 MI300X (rccl-tests all_reduce_perf in
    hisohara/ai-scripts training/01_rccl-smoketest/README.md: 13.9 us at 32 KB, 28.4 us at 1 MB, then the ring's
    ~59 us intercept plus 317 GB/s of bus bandwidth from 16 MB on) follows the lower of the two.
    """
    eff = cluster.efficiency
    per_link = cluster.scaleup_bw_bytes_per_s / max(1, cluster.scaleup_domain - 1) * eff.collective_bw_efficiency
    return size_bytes / per_link + max(1.0, n_calls) * 2 * eff.scaleup_latency_s


def mesh_peer_all_reduce_s(cluster: Cluster, size_bytes: float, group_size: int) -> float:
    """An all-reduce by an engine's own peer-to-peer kernels over a full mesh (vLLM's custom all-reduce): one stage
    (`mesh_one_shot_all_reduce_s`) or two (reduce-scatter, then all-gather, each rank reading its 1/n slices from
    every peer at once over all links: a ring's bytes in one latency step per stage), whichever is shorter
    (csrc/custom_all_reduce.cuh picks one stage below 256 KB on 8 GPUs, two above)."""
    if group_size <= 1 or size_bytes <= 0:
        return 0.0
    eff = cluster.efficiency
    bus = cluster.scaleup_bw_bytes_per_s * eff.collective_bw_efficiency
    n = group_size
    two_stage = 2 * ((n - 1) / n * size_bytes / bus + eff.scaleup_latency_s)
    return min(two_stage, mesh_one_shot_all_reduce_s(cluster, size_bytes))
