"""The files a finished run directory holds, and the check that they are there: no torch, so a command line can
name a wrong directory before it loads anything heavy."""

from __future__ import annotations

from pathlib import Path

from aiinfra.config import ConfigError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.toml"
TOKENIZER_FILE = "tokenizer.json"


def check_run_dir(run_dir: Path) -> Path:
    """`run_dir` as a Path, or a ConfigError naming it and the files a finished run has that it lacks."""
    run_dir = Path(run_dir)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(f"run directory {str(run_dir)!r} has no {', '.join(missing)}: is it a finished run?")
    return run_dir
