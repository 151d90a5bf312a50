"""A torchrun worker whose ranks each see a cache folder of their own (AIINFRA_CACHE=<base>/cache<rank>), as on
nodes whose home directories are local: building the trainer must refuse it rather than hang.

    torchrun --nproc-per-node 2 cache_worker.py BASE CORPUS
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from aiinfra.config import load_config
from aiinfra.train import Trainer


def main() -> None:
    base, corpus = Path(sys.argv[1]), sys.argv[2]
    os.environ["AIINFRA_CACHE"] = str(base / f"cache{os.environ['RANK']}")
    overrides = [f"data.corpus={corpus}", "parallel.dp_replicate=2", "train.device=cpu", "model.vocab_size=512",
                 "data.val_fraction=0.2", f"run.dir={base / 'run'}"]
    Trainer(load_config(None, overrides))


if __name__ == "__main__":
    main()
