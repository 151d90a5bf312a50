"""Distributed training on torch.distributed: layouts, device meshes, parallelize, pipelines, launch, benchmarks.

The model code (models/) never mentions ranks. This package applies parallelism from outside:

- `layout.ParallelLayout` reads the degrees (dp_replicate, dp_shard, tp, pp) off the `parallel` config and builds
  a named DeviceMesh.
- `parallelize.parallelize(model, mesh, config, device)` applies TP (+ sequence parallel), activation
  checkpointing, compile, then FSDP2 or DDP, in that order; a meta-device model is materialised after sharding
  (`materialize`: each rank allocates and initialises only its shards).
- `pipeline` splits the model into stages and builds a `torch.distributed.pipelining` schedule.
- `runtime` is what the trainer talks to: one object per process that hides whether it is alone or one of many.
- `launch` starts torchrun workers; `comm_bench` measures collectives with nccl-tests' definitions.
"""

from aiinfra.distributed.layout import ParallelLayout

__all__ = ["ParallelLayout"]
