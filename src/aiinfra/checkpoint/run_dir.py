"""A finished run directory: everything needed to use the model, with nothing else to find.

    <run>/model.safetensors   weights (safetensors: no pickle, safe to exchange)
    <run>/config.toml         the resolved configuration (reload with `aiinfra train <run>/config.toml`)
    <run>/tokenizer.json      the tokenizer the model was trained with
    <run>/metrics.jsonl       one line per step
    <run>/loss_curve.png      the loss plot
    <run>/summary.json        headline figures

Each file is written to a temporary name, fsynced, then renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from aiinfra.checkpoint.run_files import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, check_run_dir
from aiinfra.config import Config, load_config
from aiinfra.data.tokenizer import load_tokenizer
from aiinfra.models import Transformer


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_run(run_dir: Path, model: Transformer, config: Config, tokenizer: Tokenizer, summary: dict[str, Any]) -> None:
    """Write the weights, resolved config, tokenizer and summary of a finished run."""
    atomic_write(run_dir / MODEL_FILE, lambda tmp: save_model(model, str(tmp), metadata={"format": "pt"}))
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: tmp.write_text(tomli_w.dumps(config.to_dict())))
    atomic_write(run_dir / TOKENIZER_FILE, lambda tmp: tokenizer.save(str(tmp)))
    atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))


def point_latest(run_dir: Path) -> None:
    """Make <runs>/latest a symlink to the newest finished run (best effort: some filesystems refuse links)."""
    latest = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        pass


@dataclass
class LoadedRun:
    """A model ready for inference, with its config and tokenizer."""

    config: Config
    model: Transformer
    tokenizer: Tokenizer


def load_run(run_dir: Path, device: str | torch.device = "cpu", weights: bool = True) -> LoadedRun:
    """Load a finished run directory; a missing or foreign directory gives a clear error. With `weights=False` the
    model is built on the meta device and the weights file is not read."""
    run_dir = check_run_dir(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    if not weights:
        with torch.device("meta"):
            model = Transformer(config.model)
        return LoadedRun(config, model.eval(), load_tokenizer(run_dir / TOKENIZER_FILE))
    model = Transformer(config.model)
    load_model(model, str(run_dir / MODEL_FILE), device=str(device))
    return LoadedRun(config, model.to(device).eval(), load_tokenizer(run_dir / TOKENIZER_FILE))
