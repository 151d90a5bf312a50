"""Multi-process checkpoints under torchrun (gloo, CPU): FSDP round trip and resharding 2 -> 1, 2 -> 4, 2 -> FSDP x TP.

One launch of dist_worker.py on 2 ranks saves (and reloads); one launch on 4 ranks loads into two layouts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import build_model, full_state, make_state, max_abs_difference, train_step

from aiinfra.checkpoint.commit import CheckpointError
from aiinfra.checkpoint.manager import CheckpointManager, list_checkpoints

WORKER = Path(__file__).with_name("dist_worker.py")
FP32_LOSS_TOLERANCE = 1e-5  # another layout sums in another order: equal up to fp32 rounding


def torchrun(nproc: int, mode: str, workdir: Path) -> dict:
    """Run the worker on `nproc` local gloo processes and return what rank 0 saved."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(WORKER), mode, str(workdir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, f"torchrun {mode} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return torch.load(workdir / f"{mode}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    workdir = tmp_path_factory.mktemp("dist_checkpoint")
    saved = torchrun(2, "save", workdir)
    loaded = torchrun(4, "load", workdir)
    return workdir, saved, loaded


def test_fsdp_round_trip_is_exact_and_resumes_bitwise(runs):
    _, saved, _ = runs
    assert saved["loaded_step"] == 2
    assert max_abs_difference(saved["saved"], saved["loaded"]) == 0.0
    assert any(name.startswith("optim.") for name in saved["saved"])
    assert saved["resumed_loss3"] == saved["loss3"]  # same layout, RNG and data position restored


def test_time_policy_saves_on_every_rank(runs):
    workdir, saved, _ = runs
    assert saved["timed_saves"] == [True, True]
    assert [step for step, _ in list_checkpoints(workdir / "timed")] == [4, 5]


@pytest.mark.parametrize("layout", ["fsdp4", "fsdp2_tp2"])
def test_reshard_two_fsdp_ranks_into_four_ranks_and_tensor_parallel(runs, layout: str):
    _, saved, loaded = runs
    assert loaded[f"{layout}_step"] == 2
    assert max_abs_difference(saved["saved"], loaded[f"{layout}_loaded"]) == 0.0
    assert loaded[f"{layout}_loss3"] == pytest.approx(saved["plain_loss3"], abs=FP32_LOSS_TOLERANCE)


def test_reshard_two_fsdp_ranks_into_one_process(runs):
    workdir, saved, _ = runs
    state = make_state(build_model(seed=3))
    assert CheckpointManager(workdir / "ckpt").load_latest(state) == 2
    assert max_abs_difference(saved["saved"], full_state(state)) == 0.0
    assert train_step(state, dropout=False) == pytest.approx(saved["plain_loss3"], abs=FP32_LOSS_TOLERANCE)


def test_unequal_data_positions_cannot_change_data_parallel_size(runs):
    workdir, _, _ = runs
    with pytest.raises(CheckpointError, match="different data positions.*cannot be resumed exactly on 1"):
        CheckpointManager(workdir / "uneven").load_latest(make_state(build_model(seed=3)))
