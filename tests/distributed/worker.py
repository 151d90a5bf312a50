"""A torchrun worker for the equivalence tests: trains several layouts in one launch, writes what each gave.

    torchrun --nproc-per-node N tests/distributed/worker.py SPEC.json

SPEC holds `base` overrides, `layouts` {name: overrides}, `steps` and `out` (a directory). For each layout the
main rank writes <out>/<name>.pt: the per-step records, the final full parameters, and the FSDP memory figures.
With `train` (overrides) instead, each rank runs `aiinfra.train.train` and writes <out>/threads-<rank>.json: the
names of the native threads still running once it has returned.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from aiinfra.config import load_config
from aiinfra.distributed.memory import state_bytes
from aiinfra.distributed.runtime import SilentLogger, release_mesh_groups, shutdown_process_groups
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
    for name, overrides in spec["layouts"].items():
        run_layout(name, spec["base"] + overrides, spec["steps"], out)
    shutdown_process_groups()


if __name__ == "__main__":
    main()
