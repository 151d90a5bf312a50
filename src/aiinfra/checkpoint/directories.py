"""Checkpoint directories on disk: their names, listing, decommit and retirement."""

from __future__ import annotations

import shutil
from pathlib import Path

from aiinfra.checkpoint.commit import MANIFEST_FILE

STEP_PREFIX = "step_"
RETIRED_PREFIX = ".retired-"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of `step` (zero-padded so names sort by step)."""
    return f"{STEP_PREFIX}{step:09d}"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, complete or not, oldest first."""
    found = []
    for path in Path(checkpoint_dir).glob(f"{STEP_PREFIX}*"):
        suffix = path.name.removeprefix(STEP_PREFIX)
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, decommitting it first."""
    # Decommit first: a crash halfway through the deletion must leave a directory that reads as incomplete.
    (path / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def retire_checkpoint(path: Path) -> Path | None:
    """Decommit a checkpoint and move it out of the way (two metadata operations); the caller deletes the returned
    directory at leisure. Freeing a few hundred MB of extents takes a tenth of a second that no save should wait for.
    Where the file system cannot rename a directory (some object-store mounts), it is deleted here instead (None).
    """
    (path / MANIFEST_FILE).unlink(missing_ok=True)
    retired = path.with_name(f"{RETIRED_PREFIX}{path.name}")
    shutil.rmtree(retired, ignore_errors=True)
    try:
        path.rename(retired)
    except OSError:
        remove_checkpoint(path)
        return None
    return retired


def delete_all(paths: list[Path]) -> None:
    """Delete retired checkpoint directories (in the background)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
