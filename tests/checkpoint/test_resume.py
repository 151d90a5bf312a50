"""Automatic resume end to end: a run SIGKILLed between two checkpoints (fault.kill_step) and started again ends
bitwise identical to a run that was never killed: the same loss on every step of metrics.jsonl (no step twice) and
the same model.safetensors. On 2 processes (DDP, FSDP) torchrun restarts it (`--max-restarts 1`); on one process
the second `aiinfra train` on the same run directory resumes.

8 steps, a checkpoint every 3, the kill at step 5: the restart resumes from step 3 and trains 4 to 8 again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from aiinfra.config import Config, load_config
from aiinfra.train import train

STEPS, EVERY, KILL_STEP = 8, 3, 5


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token and peak-FLOP/s cache for every run of this module (each test's own would re-measure)."""
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture
def config_file(tiny_config: Config, shared_cache: Path, tmp_path: Path) -> Path:
    """tiny_config at seq 32, deterministic, one thread, checkpointing every 3 of 8 steps, as a TOML file."""
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(tiny_config.to_dict()))
    config = load_config(
        path,
        [
            f"data.cache_dir={shared_cache}",
            "model.max_seq_len=32",
            "train.seq_len=32",
            f"train.steps={STEPS}",
            "train.warmup_steps=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.deterministic=true",
            "train.threads=1",
            "run.sample_tokens=0",
            "parallel.measure_comm_every=0",
            f"checkpoint.every_steps={EVERY}",
        ],
    )
    path.write_text(tomli_w.dumps(config.to_dict()))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(killed: Path, uninterrupted: Path) -> None:
    """Every step once, the same losses, the same final weights, bit for bit; one restart counted."""
    got, want = records(killed), records(uninterrupted)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["restarts"] for r in got] == [0] * EVERY + [1] * (STEPS - EVERY)
    assert all(0 < r["effective_training_time_ratio"] <= 1 for r in got)
    weights, reference = load_file(killed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def launch(config_file: Path, overrides: list[str], max_restarts: int = 1) -> subprocess.Popen:
    """`aiinfra train --nproc 2 --max-restarts 1` (launch.py's entry point), output captured."""
    command = [sys.executable, "-m", "aiinfra.distributed.launch", "--nproc=2", f"--max-restarts={max_restarts}",
               str(config_file)]
    return subprocess.Popen(
        [*command, *(f"--set={item}" for item in overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, str], Path]:
    """The never-killed 2-process run of a layout, trained once for the whole module: the runs of every test here
    share one configuration (`config_file` differs only in where it lies), so one reference per layout serves all."""
    root = tmp_path_factory.mktemp("uninterrupted")
    done: dict[str, Path] = {}

    def run(config_file: Path, layout: str) -> Path:
        if layout not in done:
            run_dir = root / layout.replace("=", "-")
            job = launch(config_file, [layout, "train.micro_batch=4", f"run.dir={run_dir}"])
            output = job.communicate(timeout=240)[0]
            assert job.returncode == 0, output[-4000:]
            done[layout] = run_dir
        return done[layout]

    return run


@pytest.mark.parametrize("layout", ["parallel.dp_replicate=2", "parallel.dp_shard=2"], ids=["ddp", "fsdp"])
def test_two_process_run_killed_and_restarted_by_torchrun_is_bitwise_identical(
    layout: str, config_file: Path, uninterrupted: Callable[[Path, str], Path], tmp_path: Path
) -> None:
    # One job after the other: two torchruns at once can race for a port (each picks its workers' store port by
    # binding port 0 and closing it; the other can take it before the workers bind it: EADDRINUSE), and a restart
    # spent on that race would leave nothing to resume.
    reference = uninterrupted(config_file, layout)
    killed = launch(config_file, [layout, "train.micro_batch=4", f"run.dir={tmp_path / 'killed'}", "fault.kill_rank=1",
                                  f"fault.kill_step={KILL_STEP}"])
    output = killed.communicate(timeout=240)[0]
    assert killed.returncode == 0, output[-4000:]
    assert f"resumed {tmp_path / 'killed'} at step {EVERY}" in output, output[-4000:]
    assert_same_run(tmp_path / "killed", reference)


def test_a_random_fault_schedule_kills_each_attempt_and_the_run_still_ends_bitwise_identical(
    config_file: Path, uninterrupted: Callable[[Path, str], Path], tmp_path: Path
) -> None:
    """fault.random_kills=2: a random rank at a random step on attempts 0 and 1; attempt 2 finishes the run.
    Seed 11 draws rank 1 at step 4 (resumed from step 3), then rank 1 at step 7 (resumed from step 6)."""
    reference = uninterrupted(config_file, "parallel.dp_replicate=2")
    chaos = launch(config_file, ["parallel.dp_replicate=2", "train.micro_batch=4", f"run.dir={tmp_path / 'chaos'}",
                                 "fault.random_kills=2", "fault.random_seed=11"], max_restarts=2)
    output = chaos.communicate(timeout=360)[0]
    assert chaos.returncode == 0, output[-4000:]
    assert output.count("fault injection: SIGKILL rank") == 2, output[-4000:]
    got, want = records(tmp_path / "chaos"), records(reference)
    assert f"resumed {tmp_path / 'chaos'} at step {EVERY}" in output and f"at step {2 * EVERY}" in output, output
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and got[-1]["restarts"] == 2
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    weights, want_weights = load_file(tmp_path / "chaos" / "model.safetensors"), load_file(
        reference / "model.safetensors")
    assert all(torch.equal(weights[name], want_weights[name]) for name in want_weights)


def test_single_process_run_killed_then_started_again_resumes_bitwise(config_file: Path, tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    # The kill: a separate process (SIGKILL would take pytest with it).
    result = subprocess.run(
        [sys.executable, "-m", "aiinfra", "train", "--nproc=1", str(config_file), f"--set=run.dir={killed_dir}",
         f"--set=fault.kill_step={KILL_STEP}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr[-4000:]
    assert len(records(killed_dir)) == KILL_STEP and not (killed_dir / "model.safetensors").exists()
    # Started again on the same directory (without the fault): resumes from step 3, drops steps 4-5's lines.
    train(load_config(config_file, [f"run.dir={killed_dir}"]))
    train(load_config(config_file, [f"run.dir={tmp_path / 'uninterrupted'}"]))
    assert_same_run(killed_dir, tmp_path / "uninterrupted")


def test_node_local_checkpoints_resume_bitwise_and_a_missing_rank_file_is_an_error(
    config_file: Path, uninterrupted: Callable[[Path, str], Path], tmp_path: Path
) -> None:
    """checkpoint.storage=local with a directory per rank (no rank sees the other's files): FSDP on 2 processes,
    SIGKILL at step 5, torchrun restarts, the run resumes from step 3 bitwise. Then a run killed with no restart
    left, whose rank 1 loses its data file: the next start names rank 1 and the file and exits non-zero."""
    def local(name: str) -> list[str]:
        return ["parallel.dp_shard=2", "train.micro_batch=4", f"run.dir={tmp_path / name}",
                "checkpoint.storage=local", f"checkpoint.dir={tmp_path / name}-disk{{rank}}"]

    reference = uninterrupted(config_file, "parallel.dp_shard=2")  # where its checkpoints went changes no step
    outputs = []
    for name, restarts in [("killed", 1), ("damaged", 0)]:
        job = launch(config_file, [*local(name), "fault.kill_rank=1", f"fault.kill_step={KILL_STEP}"],
                     max_restarts=restarts)
        outputs.append((job.communicate(timeout=240)[0], job.returncode))
    assert [code for _, code in outputs] == [0, 1], "\n".join(out[-3000:] for out, _ in outputs)
    assert f"resumed {tmp_path / 'killed'} at step {EVERY}" in outputs[0][0], outputs[0][0][-4000:]
    assert not (tmp_path / "killed" / "checkpoints").exists()  # every file went to the per-rank directories
    assert_same_run(tmp_path / "killed", reference)

    lost = tmp_path / "damaged-disk1" / f"step_{EVERY:09d}" / "__0_0.distcp"
    lost.unlink()
    job = launch(config_file, local("damaged"), max_restarts=0)
    output = job.communicate(timeout=240)[0]
    assert job.returncode != 0, output[-4000:]
    assert "rank 1: missing file __0_0.distcp" in output and str(lost.parent) in output, output[-4000:]
    assert "step 1/" not in output  # no quiet fresh start
