"""The parallel layout: degrees of data, tensor and pipeline parallelism, and the named DeviceMesh they build."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from aiinfra.config import ConfigError, ParallelConfig

# Outermost to innermost: pipeline stages talk least, tensor-parallel ranks most, so TP gets adjacent ranks
# (the same node, the fastest links), as in torchtitan and Megatron-LM.
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """The `parallel` config section as the runtime uses it: its degrees as mesh axes, checked against a world."""

    config: ParallelConfig

    @classmethod
    def from_config(cls, config: ParallelConfig) -> ParallelLayout:
        """The layout a `parallel` config section asks for."""
        return cls(config)

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def dp_size(self) -> int:
        """Ranks that each take a different slice of the global batch."""
        return self.config.dp_size

    def degrees(self) -> dict[str, int]:
        """Axis name -> degree, outermost first."""
        return {axis: getattr(self.config, axis) for axis in MESH_AXES}

    def describe(self) -> str:
        """'dp_shard=2 x tp=2', or 'single process'."""
        parts = [f"{name}={degree}" for name, degree in self.degrees().items() if degree > 1]
        return " x ".join(parts) or "single process"

    def validate(self, world_size: int) -> None:
        """Raise a ConfigError unless the degrees multiply to `world_size`."""
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel layout {self.describe()} needs {self.world_size} processes "
                f"(pp*dp_replicate*dp_shard*tp), but the world has {world_size}; set parallel.* so they multiply "
                f"to {world_size}, or launch with --nproc {self.world_size}"
            )

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """A DeviceMesh with one named axis per degree (size-1 axes included, so code can always ask for any
        axis), and the flattened 'dp' mesh over both data-parallel axes: where the batch is split."""
        mesh = init_device_mesh(device_type, tuple(self.degrees().values()), mesh_dim_names=MESH_AXES)
        return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
