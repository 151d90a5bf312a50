"""A training process for the crash tests: resume from CHECKPOINT_DIR if it can, train to step 3, saving every step.

    python crash_writer.py CHECKPOINT_DIR EXPECTED_DIR

Before each save it writes the full state it is about to checkpoint to EXPECTED_DIR/step<N>.pt, so a test can
compare what a later start loads with what was saved. AIINFRA_CHECKPOINT_FAULT (commit.py) makes a save die or
pause at a chosen phase. Saves are asynchronous: the next step runs while the previous checkpoint is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ckpt_helpers import build_model, full_state, make_state, train_step

from aiinfra.checkpoint.manager import CheckpointManager, CheckpointPolicy

LAST_STEP = 3


def main(checkpoint_dir: Path, expected_dir: Path) -> None:
    torch.set_num_threads(1)
    expected_dir.mkdir(parents=True, exist_ok=True)
    state = make_state(build_model(seed=0, tie_embeddings=True))
    manager = CheckpointManager(checkpoint_dir, CheckpointPolicy(every_steps=1, keep_last=5, async_save=True))
    start = manager.load_latest(state) or 0
    print(f"resumed from step {start}", flush=True)
    for step in range(start + 1, LAST_STEP + 1):
        train_step(state)
        torch.save(full_state(state), expected_dir / f"step{step}.pt")
        manager.maybe_save(step, state)
    manager.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
