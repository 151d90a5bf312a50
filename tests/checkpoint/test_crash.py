"""Crash consistency: the writer is SIGKILLed at each phase of a checkpoint write, for real, in a subprocess.

The next start must load the last complete checkpoint, with exactly the weights that were saved, and training resumed
from it must reach the same step-3 weights, bit for bit, as the killed run had before its last save (RNG and data
position restored too).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from ckpt_helpers import build_model, full_state, make_state, train_step

from aiinfra.checkpoint.commit import FAULT_ENV, CheckpointError, fault_hook_from_env
from aiinfra.checkpoint.manager import CheckpointManager, CheckpointPolicy

WRITER = Path(__file__).with_name("crash_writer.py")
SAFETY_TIMEOUT_S = 120  # only against a hung child; nothing here measures time


def run_writer(checkpoint_dir: Path, expected_dir: Path, fault: str | None) -> subprocess.CompletedProcess:
    """Run crash_writer.py to completion (or to its death) with the fault injected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, str(WRITER), str(checkpoint_dir), str(expected_dir)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=SAFETY_TIMEOUT_S)


def run_writer_and_kill_when_paused(checkpoint_dir: Path, expected_dir: Path, fault: str) -> int:
    """Start the writer with a pause fault, SIGKILL it from outside once it reports the pause; its return code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: fault}
    command = [sys.executable, str(WRITER), str(checkpoint_dir), str(expected_dir)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    watchdog = threading.Timer(SAFETY_TIMEOUT_S, process.kill)
    watchdog.start()
    try:
        for line in process.stderr:
            if line.startswith("checkpoint fault: pause"):
                os.kill(process.pid, signal.SIGKILL)
                break
        return process.wait()
    finally:
        watchdog.cancel()
        process.stderr.close()


@pytest.mark.parametrize(
    ("fault", "survivor"),
    [
        ("before_data:kill@3", 2),
        ("mid_data:pause@3", 2),
        ("before_manifest:kill@3", 2),
        ("after_manifest:kill@3", 3),
    ],
)
def test_kill_at_each_phase_then_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str, survivor: int):
    checkpoints, killed_run = tmp_path / "ckpt", tmp_path / "killed"
    if ":pause" in fault:
        returncode = run_writer_and_kill_when_paused(checkpoints, killed_run, fault)
    else:
        returncode = run_writer(checkpoints, killed_run, fault).returncode
    assert returncode == -signal.SIGKILL

    # The next start (in this process, on one thread as the writer): the newest checkpoint that committed, holding
    # the weights saved at that step; a torn step 3 is reported in one warning line.
    state = make_state(build_model(seed=99, tie_embeddings=True))
    manager = CheckpointManager(checkpoints, CheckpointPolicy(every_steps=1, async_save=False))
    with caplog.at_level(logging.WARNING, logger="aiinfra.checkpoint.manager"):
        assert manager.load_latest(state) == survivor
    assert_equal_states(full_state(state), torch.load(killed_run / f"step{survivor}.pt"))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    if survivor == 2:
        assert len(warnings) == 1 and "step_000000003" in warnings[0] and "no manifest.json" in warnings[0]
        # Resuming rewrites the torn step 3 and ends bit for bit where the killed run was before that save.
        train_step(state)
        assert manager.maybe_save(3, state)
    else:
        assert warnings == []
    manager.close()
    final = make_state(build_model(seed=98, tie_embeddings=True))
    assert CheckpointManager(checkpoints).load_latest(final) == 3
    assert_equal_states(full_state(final), torch.load(killed_run / "step3.pt"))


def assert_equal_states(loaded: dict, saved: dict) -> None:
    """Bitwise equality of two full states (model and optimizer tensors by name)."""
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_fault_spec_is_validated():
    assert fault_hook_from_env({}) is None
    with pytest.raises(CheckpointError, match="expected <phase>:<kill|pause>"):
        fault_hook_from_env({FAULT_ENV: "during_lunch:kill"})
    with pytest.raises(CheckpointError, match="expected <phase>:<kill|pause>"):
        fault_hook_from_env({FAULT_ENV: "mid_data:explode@x"})
