"""Activations kept in host memory during a training step: what their transfers over the device's host link expose
beyond the pass they run under (MaxText's offloaded remat policies; Megatron-Core's whole-layer CPU offload)."""

from __future__ import annotations

from aiinfra.plan.cluster import Cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import offloaded_layer_bytes
from aiinfra.plan.memory import stored_layer_bytes as _stored_layer_bytes
from aiinfra.spec import ModelSpec


def _exposed_transfer_s(what: str, cluster: Cluster, size: float, forward_s: float, backward_s: float) -> float:
    """`size` bytes to the host during the forward and back during the backward over the device's host link: the
    excess of each transfer over the pass it runs under."""
    host_gbs = cluster.accelerator.host_bw_gbs
    if not host_gbs:
        raise PlanError(f"{what}: hardware {cluster.accelerator.id!r} has no host_bw_gbs in the catalog")
    transfer = size / (host_gbs * 1e9)
    return max(0.0, transfer - forward_s) + max(0.0, transfer - backward_s)


def layer_offload_exposed_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster,
                            forward_s: float, backward_s: float) -> float:
    """Whole-layer CPU offload (Megatron-Core --cpu-offloading with --cpu-offloading-num-layers, activations): every
    saved tensor of an offloaded layer goes to host memory during its forward and comes back before its backward, by
    copy engines on their own stream, so only the excess over the pass it runs under is exposed; averaged over the
    stage's layers (the share `offload_layer_fraction`)."""
    if layout.offload_layer_fraction <= 0:
        return 0.0
    size = _stored_layer_bytes(spec, settings, layout)
    return layout.offload_layer_fraction * _exposed_transfer_s("layer offload", cluster, size, forward_s, backward_s)


def host_transfer_exposed_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster,
                            forward_s: float, backward_s: float) -> float:
    """Offloaded activations of one layer and micro-batch: written to the host during the forward, read back during
    the backward, each through the device's host link by DMA engines that leave the compute units free, so only the
    excess over the pass they run under is exposed."""
    size = offloaded_layer_bytes(spec, settings, layout)
    if size <= 0:
        return 0.0
    return _exposed_transfer_s("activation offload", cluster, size, forward_s, backward_s)
