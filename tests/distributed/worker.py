"""A torchrun worker for the equivalence tests: trains several layouts in one launch, writes what each gave.

    torchrun --nproc-per-node N tests/distributed/worker.py SPEC.json

SPEC holds `base` overrides, `layouts` {name: overrides}, `steps` and `out` (a directory). For each layout the
main rank writes <out>/<name>.pt: the per-step records, the final full parameters, and the FSDP memory figures.
With `train` (overrides) instead, each rank runs `aiinfra.train.train` and writes <out>/threads-<rank>.json: the
names of the native threads still running once it has returned. With `memory` (overrides) instead, each rank
builds the trainer, trains `steps` steps and writes <out>/memory-<rank>.json: its peak RSS before the model was
built, once it was built, and after training, and the bytes its shards of parameters, gradients and optimizer
state hold.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from aiinfra.config import load_config
from aiinfra.data.dataset import prepare_dataset
from aiinfra.distributed.memory import state_bytes
from aiinfra.distributed.runtime import SilentLogger, release_mesh_groups, shutdown_process_groups
from aiinfra.observe.device_peak import device_peak
from aiinfra.train import Trainer, train


def run_layout(name: str, overrides: list[str], steps: int, out: Path) -> None:
    config = load_config(None, overrides)
    trainer = Trainer(config, run_dir=out / name)
    records = [trainer.run_step(SilentLogger()) for _ in range(steps)]
    # One more forward/backward (no step) so that gradients exist when the memory is counted.
    inputs, targets = trainer.sampler.next_batch()
    trainer.runner.forward_backward(inputs, targets, 1.0)
    memory = state_bytes(trainer.runner.root, trainer.optimizer)
    full_model = trainer.runtime.export_model(trainer.runner)
    if trainer.runtime.is_main:
        torch.save({"records": records, "state": full_model.state_dict(), "memory": memory}, out / f"{name}.pt")
    release_mesh_groups(trainer.runtime.mesh)  # its groups go with the others at the end (shutdown_process_groups)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(overrides: list[str], steps: int, out: Path) -> None:
    """Peak RSS around building the trainer and training `steps` steps; the tokenized corpus is cached first, so
    that the baseline holds everything but the model."""
    config = load_config(None, overrides)
    dist.init_process_group("gloo")
    cache_dir = Path(config.data.cache_dir)
    for rank in (0, 1):  # rank 0 fills the caches, then the others read them
        if dist.get_rank() == rank:
            prepare_dataset(config.data.corpus, config.model.vocab_size, config.data.val_fraction, cache_dir)
            device_peak(torch.device("cpu"), torch.float32, cache_dir)
        dist.barrier()
    gc.collect()
    figures = {"baseline_peak_rss_bytes": peak_rss_bytes()}
    trainer = Trainer(config, run_dir=out / "memory")
    figures["built_peak_rss_bytes"] = peak_rss_bytes()
    for _ in range(steps):
        trainer.run_step(SilentLogger())
    figures["trained_peak_rss_bytes"] = peak_rss_bytes()
    # One more forward/backward (no step) so that gradients exist when the shards are counted.
    inputs, targets = trainer.sampler.next_batch()
    trainer.runner.forward_backward(inputs, targets, 1.0)
    figures |= state_bytes(trainer.runner.root, trainer.optimizer)
    (out / f"memory-{dist.get_rank()}.json").write_text(json.dumps(figures))
    release_mesh_groups(trainer.runtime.mesh)
    trainer.checkpoints.close()


def native_threads() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    if "train" in spec:
        train(load_config(None, spec["train"]))
        (out / f"threads-{os.environ['RANK']}.json").write_text(json.dumps(native_threads()))
        return
    if "memory" in spec:
        measure_memory(spec["memory"], spec["steps"], out)
        shutdown_process_groups()
        return
    for name, overrides in spec["layouts"].items():
        run_layout(name, spec["base"] + overrides, spec["steps"], out)
    shutdown_process_groups()


if __name__ == "__main__":
    main()
