"""Multi-process fixtures: a tiny fp32 model, its single-process reference, and torchrun launches of the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aiinfra.config import load_config
from aiinfra.distributed.runtime import SilentLogger
from aiinfra.train import Trainer

WORKER = Path(__file__).with_name("worker.py")
STEPS = 10
GLOBAL_BATCH = 8


def base_overrides(corpus: Path, cache_dir: Path) -> list[str]:
    """dim 64, 4 layers, seq 32, fp32, deterministic data: small enough for 4 processes on 2 cores."""
    return [
        f"data.corpus={corpus}",
        f"data.cache_dir={cache_dir}",
        "data.val_fraction=0.2",
        "model.vocab_size=512",
        "model.dim=64",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_dim=128",
        "model.max_seq_len=32",
        "train.seq_len=32",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.dtype=fp32",
        "train.device=cpu",
        "run.progress=false",
        "run.sample_tokens=0",
        "parallel.measure_comm_every=5",
    ]


def torchrun(nproc: int, spec: dict, workdir: Path, timeout_s: float = 240) -> None:
    """Launch the worker on `nproc` local processes (gloo, a free port), raising with its output on failure."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(WORKER), str(spec_path)], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )


def reference(overrides: list[str], run_dir: Path) -> dict:
    """The single-process run the layouts must reproduce: same global batch, same seed."""
    trainer = Trainer(load_config(None, [*overrides, f"train.micro_batch={GLOBAL_BATCH}"]), run_dir=run_dir)
    records = [trainer.run_step(SilentLogger()) for _ in range(STEPS)]
    return {"records": records, "state": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


@pytest.fixture(scope="session")
def dist_corpus(small_corpus: Path) -> Path:
    """tests/conftest.py's small corpus; `base` gives it a token cache of its own."""
    return small_corpus


@pytest.fixture(scope="session")
def base(dist_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return base_overrides(dist_corpus, tmp_path_factory.mktemp("dist_cache"))


def launch_layouts(nproc: int, layouts: dict[str, list[str]], base: list[str], workdir: Path) -> dict[str, dict]:
    """Run every layout in one torchrun launch; return {name: what the worker saved}."""
    torchrun(nproc, {"base": base, "layouts": layouts, "steps": STEPS, "out": str(workdir)}, workdir)
    return {name: torch.load(workdir / f"{name}.pt", weights_only=False) for name in layouts}


@pytest.fixture(scope="session")
def run_worker():
    """`run_worker(nproc, spec, workdir)`: worker.py under torchrun (see torchrun)."""
    return torchrun


@pytest.fixture(scope="session")
def launch():
    """`launch(nproc, layouts, base, workdir)`: run layouts under torchrun (see launch_layouts)."""
    return launch_layouts


@pytest.fixture(scope="session")
def single_process():
    """`single_process(overrides, run_dir)`: the reference run (see reference)."""
    return reference


@pytest.fixture(scope="session")
def references(base: list[str], single_process, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict]:
    """Single-process runs, tied and untied embeddings."""
    workdir = tmp_path_factory.mktemp("reference")
    return {
        tied: single_process(base + ([] if tied else ["model.tie_embeddings=false"]), workdir / str(tied))
        for tied in (True, False)
    }
