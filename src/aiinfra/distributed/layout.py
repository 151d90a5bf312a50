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
    """How many ranks each kind of parallelism spans; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_config(cls, config: ParallelConfig) -> ParallelLayout:
        """The layout a `parallel` config section asks for."""
        return cls(config.dp_replicate, config.dp_shard, config.tp, config.pp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Ranks that each take a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    def degrees(self) -> dict[str, int]:
        """Axis name -> degree, outermost first."""
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}

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
