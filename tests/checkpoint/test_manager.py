"""Single-process checkpointing: round trip, integrity checks and fallback, retention, async save, policy, metrics."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from ckpt_helpers import build_model, full_state, make_state, train_step

from aiinfra.checkpoint import commit
from aiinfra.checkpoint.commit import MANIFEST_FILE, CheckpointError
from aiinfra.checkpoint.manager import (
    CheckpointManager,
    CheckpointPolicy,
    Goodput,
    TrainingState,
    effective_training_time_ratio,
    list_checkpoints,
)


def trained_state(steps: int, seed: int = 0) -> TrainingState:
    state = make_state(build_model(seed, tie_embeddings=True))
    for _ in range(steps):
        train_step(state)
    return state


def assert_same(loaded: TrainingState, saved: dict, saved_extras: dict) -> None:
    """Model, optimizer, scheduler and data position of `loaded` equal what was saved, bit for bit."""
    current = full_state(loaded)
    assert current.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(current[name], tensor), name
    assert loaded.lr_scheduler.state_dict() == saved_extras["lr_scheduler"]
    assert loaded.data.state_dict() == saved_extras["data"]


def extras(state: TrainingState) -> dict:
    return {"lr_scheduler": state.lr_scheduler.state_dict(), "data": state.data.state_dict()}


def test_round_trip_restores_everything_and_resumes_identically(tmp_path: Path):
    state = trained_state(3)
    saved, saved_extras = full_state(state), extras(state)
    goodput = Goodput()
    goodput.add_step(1.5)
    state.extra["goodput"] = goodput
    manager = CheckpointManager(tmp_path, CheckpointPolicy(async_save=False))
    manager.save(3, state)
    rng_after_save = torch.get_rng_state()
    next_loss = train_step(state)

    torch.manual_seed(12345)  # a fresh start draws different random numbers until the RNG state is restored
    restored = make_state(build_model(seed=1, tie_embeddings=True))
    restored.extra["goodput"] = Goodput()
    assert CheckpointManager(tmp_path).load_latest(restored) == 3
    assert_same(restored, saved, saved_extras)
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    assert restored.extra["goodput"].productive_s == 1.5
    assert train_step(restored) == next_loss


def test_empty_directory_has_nothing_to_load(tmp_path: Path):
    assert CheckpointManager(tmp_path / "none").load_latest(trained_state(0)) is None


def corrupt_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def data_file(checkpoint: Path) -> Path:
    return next(checkpoint.glob("*.distcp"))


@pytest.mark.parametrize(
    ("damage", "reported"),
    [
        (lambda ckpt: corrupt_flip_byte(data_file(ckpt)), "xxh3_128"),
        (lambda ckpt: corrupt_truncate(data_file(ckpt)), "truncated"),
        (lambda ckpt: corrupt_flip_byte(ckpt / ".metadata"), "xxh3_128"),
        (lambda ckpt: data_file(ckpt).unlink(), "missing file"),
        (lambda ckpt: (ckpt / MANIFEST_FILE).write_text('{"format": "aiinfra-checkpoint/1", "fil'), "corrupted"),
    ],
    ids=["flipped-data-byte", "truncated-data", "flipped-metadata-byte", "missing-data", "torn-manifest"],
)
def test_damaged_checkpoint_is_reported_and_previous_used(tmp_path: Path, caplog, damage, reported: str):
    state = trained_state(1)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(async_save=False))
    manager.save(1, state)
    saved, saved_extras = full_state(state), extras(state)
    train_step(state)
    manager.save(2, state)
    damage(tmp_path / "step_000000002")

    restored = trained_state(0, seed=5)
    with caplog.at_level(logging.WARNING, logger="aiinfra.checkpoint.manager"):
        assert CheckpointManager(tmp_path).load_latest(restored) == 1
    assert_same(restored, saved, saved_extras)
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert "step_000000002" in lines[0] and reported in lines[0] and "falling back" in lines[0]


def test_checksums_are_xxh3_and_verified_while_loading_each_data_byte_read_once(tmp_path: Path, monkeypatch):
    state = trained_state(1)
    CheckpointManager(tmp_path, CheckpointPolicy(async_save=False)).save(1, state)
    manifest = json.loads((tmp_path / "step_000000001" / MANIFEST_FILE).read_text())
    assert manifest["checksum"] == "xxh3_128" and all("xxh3_128" in entry for entry in manifest["files"].values())
    data_bytes = sum(entry["bytes"] for name, entry in manifest["files"].items() if name.endswith(".distcp"))
    checksummed = []
    original = commit._VerifyingReader.finish

    def counting_finish(reader):
        digest = original(reader)
        checksummed.append(reader.checksummed)
        return digest

    monkeypatch.setattr(commit._VerifyingReader, "finish", counting_finish)
    whole_reads = []
    original_checksum_file = commit.checksum_file
    monkeypatch.setattr(commit, "checksum_file", lambda path, *args: (whole_reads.append(path.name),
                                                                      original_checksum_file(path, *args))[1])
    assert CheckpointManager(tmp_path).load_latest(trained_state(0, seed=5)) == 1
    assert sum(checksummed) == data_bytes  # every data byte checksummed once, while DCP read it
    assert whole_reads == [".metadata"]  # the only file read whole before loading


def test_a_damaged_checkpoint_with_nothing_earlier_is_an_error_not_a_fresh_start(tmp_path: Path):
    state = trained_state(1)
    CheckpointManager(tmp_path, CheckpointPolicy(async_save=False)).save(1, state)
    corrupt_flip_byte(data_file(tmp_path / "step_000000001"))
    with pytest.raises(CheckpointError, match="step_000000001 is damaged and no earlier one is usable"):
        CheckpointManager(tmp_path).load_latest(trained_state(0, seed=5))


def test_node_local_checkpoint_round_trips_and_refuses_a_shared_resume(tmp_path: Path):
    state = trained_state(2)
    saved, saved_extras = full_state(state), extras(state)
    CheckpointManager(tmp_path, CheckpointPolicy(async_save=False), storage="local").save(2, state)
    manifest = json.loads((tmp_path / "step_000000002" / MANIFEST_FILE).read_text())
    assert manifest["storage"] == "local" and manifest["rank_files"][0].keys() == manifest["files"].keys()
    restored = trained_state(0, seed=5)
    assert CheckpointManager(tmp_path, storage="local").load_latest(restored) == 2
    assert_same(restored, saved, saved_extras)
    with pytest.raises(CheckpointError, match="saved with checkpoint.storage='local'"):
        CheckpointManager(tmp_path).load_latest(trained_state(0, seed=5))


def test_retention_keeps_last_k_and_drops_torn_leftovers(tmp_path: Path):
    state = trained_state(0)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(every_steps=2, keep_last=3, async_save=True))
    (tmp_path / "step_000000007").mkdir()  # torn leftover of an earlier attempt
    saved_at = [step for step in range(1, 11) if (train_step(state), manager.maybe_save(step, state))[1]]
    manager.close()
    assert saved_at == [2, 4, 6, 8, 10]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 8, 10]
    assert all((path / MANIFEST_FILE).is_file() for _, path in list_checkpoints(tmp_path))
    assert manager.metrics.saves == 5 and manager.metrics.last_step == 10 and manager.metrics.last_bytes > 0


def test_dropped_checkpoints_leave_the_listing_at_once_and_leftovers_are_deleted(tmp_path: Path):
    state = trained_state(0)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(keep_last=1, async_save=False))
    manager.save(1, state)
    manager.save(2, state)
    # Retention decommits and renames at once; the deletion itself runs in the background.
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    manager.wait()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000000002"]
    manager.close()
    (tmp_path / ".retired-step_000000001").mkdir()  # a deletion cut short by a crash
    CheckpointManager(tmp_path).close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000000002"]


def test_flush_behind_covers_every_file_in_order_and_keeps_it_loadable(tmp_path: Path, monkeypatch):
    ranges: dict[int, list[tuple[int, int]]] = {}

    def record(fd: int, offset: int, length: int) -> None:
        ranges.setdefault(os.fstat(fd).st_ino, []).append((offset, length))

    monkeypatch.setattr(commit, "FLUSH_BEHIND_BYTES", 4096)
    monkeypatch.setattr(commit, "start_writeback", record)
    state = trained_state(1)
    saved, saved_extras = full_state(state), extras(state)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(async_save=False))
    manager.save(1, state)
    files = {path.stat().st_ino: path.stat().st_size for path in (tmp_path / "step_000000001").glob("*.distcp")}
    assert files and set(files) <= set(ranges)
    for inode, size in files.items():
        written_back = 0
        for offset, length in ranges[inode]:
            assert offset == written_back and length >= 4096  # contiguous, from the start, in FLUSH_BEHIND steps
            written_back += length
        assert size - 4096 < written_back <= size  # only a tail under FLUSH_BEHIND_BYTES is left to fsync
    restored = make_state(build_model(seed=1, tie_embeddings=True))
    assert CheckpointManager(tmp_path).load_latest(restored) == 1
    assert_same(restored, saved, saved_extras)


def test_retention_deletes_in_place_where_directories_cannot_be_renamed(tmp_path: Path, monkeypatch):
    rename = Path.rename

    def no_directory_rename(self: Path, target):
        if self.is_dir():
            raise OSError(95, "Operation not supported")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", no_directory_rename)
    state = trained_state(0)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(keep_last=1, async_save=False))
    manager.save(1, state)
    manager.save(2, state)
    manager.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000000002"]


def test_time_policy_and_no_double_save(tmp_path: Path):
    state = trained_state(0)
    always = CheckpointManager(tmp_path / "a", CheckpointPolicy(every_seconds=1e-9, async_save=False))
    assert always.maybe_save(1, state) and always.maybe_save(2, state)
    assert not always.maybe_save(2, state)  # the same step is never written twice
    never = CheckpointManager(tmp_path / "b", CheckpointPolicy(every_seconds=1e9, async_save=False))
    assert not never.maybe_save(1, state)


def test_async_save_returns_before_the_write_and_equals_a_sync_save(tmp_path: Path):
    release = threading.Event()
    reached_data = threading.Event()

    def hold_mid_data(phase: str, step: int) -> None:
        if phase == "mid_data" and step == 2:
            reached_data.set()
            assert release.wait(timeout=120), "the test never released the writer"

    state = trained_state(2)
    saved, saved_extras = full_state(state), extras(state)
    CheckpointManager(tmp_path / "sync", CheckpointPolicy(async_save=False)).save(2, state)
    manager = CheckpointManager(tmp_path / "async", CheckpointPolicy(async_save=True), fault_hook=hold_mid_data)
    manager.save(2, state)
    # save() has returned while the writer is held inside the data file: nothing is committed yet.
    assert manager.save_in_flight
    assert not (tmp_path / "async" / "step_000000002" / MANIFEST_FILE).exists()
    train_step(state)  # training goes on and changes every tensor while the checkpoint is being written
    assert reached_data.wait(timeout=120)
    release.set()
    manager.wait()
    assert not manager.save_in_flight and manager.metrics.saves == 1

    from_async, from_sync = trained_state(0, seed=3), trained_state(0, seed=4)
    assert CheckpointManager(tmp_path / "async").load_latest(from_async) == 2
    assert CheckpointManager(tmp_path / "sync").load_latest(from_sync) == 2
    assert_same(from_async, saved, saved_extras)
    assert_same(from_sync, saved, saved_extras)
    async_manifest = json.loads((tmp_path / "async" / "step_000000002" / MANIFEST_FILE).read_text())
    sync_manifest = json.loads((tmp_path / "sync" / "step_000000002" / MANIFEST_FILE).read_text())
    # The data files are byte-identical; only DCP's .metadata differs (it records the checkpoint's path).
    data_files = [name for name in sync_manifest["files"] if name.endswith(".distcp")]
    assert data_files and all(async_manifest["files"][name] == sync_manifest["files"][name] for name in data_files)

    # A second async save reuses the staging buffers: it holds the new state, and the first checkpoint is intact.
    saved3, saved3_extras = full_state(state), extras(state)
    manager.save(3, state)
    train_step(state)
    manager.close()
    from_step3 = trained_state(0, seed=6)
    assert CheckpointManager(tmp_path / "async").load_latest(from_step3) == 3
    assert_same(from_step3, saved3, saved3_extras)
    assert CheckpointManager(tmp_path / "async").load(tmp_path / "async" / "step_000000002", from_async) == 2
    assert_same(from_async, saved, saved_extras)


def test_an_overlapped_staging_copy_runs_beside_the_next_step_and_holds_the_state_at_save_time(tmp_path: Path):
    copying = threading.Event()
    release = threading.Event()
    state = trained_state(2)
    saved, saved_extras = full_state(state), extras(state)
    manager = CheckpointManager(tmp_path, CheckpointPolicy(async_save=True, overlap_staging=True))
    original_copy = torch.Tensor.copy_
    staging_thread: list[str] = []

    def held_copy(self: torch.Tensor, *args, **kwargs):  # hold the staging thread inside its first copy
        if threading.current_thread().name.startswith("checkpoint-staging") and not copying.is_set():
            staging_thread.append(threading.current_thread().name)
            copying.set()
            assert release.wait(timeout=120)
        return original_copy(self, *args, **kwargs)

    torch.Tensor.copy_ = held_copy
    try:
        manager.save(2, state)  # returns while the copy is held: the state is not yet staged
        assert copying.wait(timeout=120) and staging_thread
        state.model(state.data.next_batch()[0]).float().mean().backward()  # the next step's forward and backward
        release.set()
        manager.before_update()  # the optimizer step waits for the copy, then changes every tensor
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    finally:
        torch.Tensor.copy_ = original_copy
    manager.close()
    assert manager.metrics.saves == 1
    loaded = trained_state(0, seed=3)
    assert CheckpointManager(tmp_path).load_latest(loaded) == 2
    assert_same(loaded, saved, saved_extras)


def test_background_failure_is_raised_on_the_next_call(tmp_path: Path):
    def fail(phase: str, step: int) -> None:
        if phase == "before_manifest":
            raise OSError("disk full")

    manager = CheckpointManager(tmp_path, CheckpointPolicy(async_save=True), fault_hook=fail)
    manager.save(1, trained_state(0))
    with pytest.raises(CheckpointError, match="step_000000001 failed: disk full"):
        manager.wait()


def test_checkpoint_of_another_model_fails_clearly(tmp_path: Path):
    CheckpointManager(tmp_path, CheckpointPolicy(async_save=False)).save(1, trained_state(0))
    wider = make_state(build_model(seed=0, tie_embeddings=True, dim=128))
    with pytest.raises(CheckpointError, match="does not fit this model/layout"):
        CheckpointManager(tmp_path).load_latest(wider)


def test_effective_training_time_ratio():
    assert effective_training_time_ratio(90.0, 100.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="wall_s=0"):
        effective_training_time_ratio(1.0, 0.0)
    goodput = Goodput()
    goodput.load_state_dict({"first_start_unix_s": goodput.first_start_unix_s - 100.0, "productive_s": 50.0})
    assert 0.0 < goodput.ratio() <= 0.5
