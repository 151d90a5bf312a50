"""Everything written to disk by training: run directories, checkpoints, export.

The checkpoint API lives in `aiinfra.checkpoint.manager` (imported lazily here, so that loading a finished run
directory does not pay for importing torch.distributed.checkpoint).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointError": "aiinfra.checkpoint.commit",
    "CheckpointManager": "aiinfra.checkpoint.manager",
    "CheckpointMetrics": "aiinfra.checkpoint.manager",
    "CheckpointPolicy": "aiinfra.checkpoint.manager",
    "Goodput": "aiinfra.checkpoint.goodput",
    "TrainingState": "aiinfra.checkpoint.state",
    "effective_training_time_ratio": "aiinfra.checkpoint.goodput",
    "list_checkpoints": "aiinfra.checkpoint.manager",
    "export_hf": "aiinfra.checkpoint.export",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'aiinfra.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
