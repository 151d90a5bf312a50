"""A torchrun worker for the equivalence tests: trains several layouts in one launch, writes what each gave.

    torchrun --nproc-per-node N tests/distributed/worker.py SPEC.json

SPEC holds `base` overrides, `layouts` {name: overrides}, `steps` and `out` (a directory). For each layout the
main rank writes <out>/<name>.pt: the per-step records, the final full parameters, and the FSDP memory figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from aiinfra.config import load_config
from aiinfra.distributed.memory import state_bytes
from aiinfra.distributed.runtime import SilentLogger
from aiinfra.train import Trainer


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


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for name, overrides in spec["layouts"].items():
        run_layout(name, spec["base"] + overrides, spec["steps"], out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
