"""Shared fixtures: a small corpus on disk and a tiny config that trains in seconds."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aiinfra.config import Config, load_config

# Keep tests quick and repeatable on a 2-core machine.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of 60 small, varied Python-like documents (enough to split into train and validation)."""
    root = tmp_path_factory.mktemp("corpus")
    for index in range(60):
        body = "\n".join(
            f'def function_{index}_{j}(value):\n    """Return value times {j}."""\n    return value * {j}\n'
            for j in range(20)
        )
        (root / f"module_{index:02d}.py").write_text(f"# module {index}\nimport os\n\n{body}")
    return root


@pytest.fixture
def tiny_config(small_corpus: Path, tmp_path: Path) -> Config:
    """A model and run small enough to train 50 steps in a few seconds, in fp32."""
    return load_config(
        None,
        [
            f"data.corpus={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.2",
            "model.vocab_size=512",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.ffn_dim=128",
            "model.max_seq_len=64",
            "train.seq_len=64",
            "train.micro_batch=8",
            "train.steps=50",
            "train.warmup_steps=5",
            "train.eval_every=25",
            "train.eval_batches=2",
            "train.dtype=fp32",
            "train.device=cpu",
            f"run.dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.sample_tokens=10",
        ],
    )


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test (then back): for tests that compare with one-thread subprocesses, or whose
    tiny matmuls gain nothing from a second thread that would only spin against other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or rendezvous a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
