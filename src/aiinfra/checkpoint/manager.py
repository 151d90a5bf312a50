"""Sharded, asynchronous, verified training checkpoints over torch.distributed.checkpoint (DCP).

    <checkpoint_dir>/step_000000100/__0_0.distcp ...   one data file per rank (DCP)
    <checkpoint_dir>/step_000000100/.metadata          DCP's index of every tensor shard
    <checkpoint_dir>/step_000000100/manifest.json      ours, written last: the commit record (see commit.py)

A checkpoint holds the model and optimizer (through `get_state_dict`, so plain, DDP, FSDP2 and TP modules all
work and DCP reshards on load; see `storage` for node-local disks), the LR scheduler, the step, the RNG states of
every rank and the data position of every data-parallel rank. The trainer calls, on every rank:

    manager = CheckpointManager(run_dir / "checkpoints", CheckpointPolicy(every_steps=100, keep_last=3))
    state = TrainingState(model, optimizer, lr_scheduler, data=sampler, extra={"goodput": goodput})
    start_step = manager.load_latest(state) or 0
    for step in range(start_step + 1, steps + 1):
        ...train one step...
        manager.maybe_save(step, state)
    manager.save(steps, state); manager.close()
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from aiinfra.checkpoint.commit import (
    MANIFEST_FILE,
    CheckpointError,
    DamagedCheckpointError,
    FaultHook,
    HashingFileSystemWriter,
    VerifyingFileSystemReader,
    check_before_load,
    data_files,
    describe_failure,
    fault_hook_from_env,
    files_to_verify,
    read_manifest,
    write_manifest,
    write_manifest_copy,
)
from aiinfra.checkpoint.directories import (
    RETIRED_PREFIX,
    checkpoint_name,
    delete_all,
    list_checkpoints,
    remove_checkpoint,
    retire_checkpoint,
)
from aiinfra.checkpoint.goodput import Goodput, effective_training_time_ratio
from aiinfra.checkpoint.policy import CheckpointMetrics, CheckpointPolicy
from aiinfra.checkpoint.staging import ReusedBufferStager
from aiinfra.checkpoint.state import Stateful, TrainingState, local_shards, rng_state, set_rng_state, take_loaded_values

log = logging.getLogger(__name__)
# Optimizer state keyed by parameter name ("param_groups.<fqn>.lr"), not by group index: pipeline ranks hold
# different parameters, and index-keyed param groups saved under the same key on every rank are deduplicated by DCP
# (one rank's groups, naming its parameters, came back on all: AdamW then lost "betas" on the others).
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# We pass no_dist=True on purpose when torch.distributed is not initialized; DCP still warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointManager:
    """Saves and loads `TrainingState`s under one directory; create and call it on every rank alike."""

    def __init__(
        self,
        checkpoint_dir: Path,
        policy: CheckpointPolicy | None = None,
        *,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        fault_hook: FaultHook | None = None,
        timeout_s: float | None = None,
        storage: str = "shared",
    ):
        """`storage` is 'shared' (every rank sees every file: one DCP checkpoint, reshardable) or 'local' (each rank
        sees only its own `checkpoint_dir`, a node-local disk: each rank saves, verifies and loads a checkpoint of
        its own shards; rank 0 commits once every rank has reported its files; the same layout resumes)."""
        if storage not in ("shared", "local"):
            raise ValueError(f"storage={storage!r}: expected 'shared' or 'local'")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.local = storage == "local"
        self.policy = policy or CheckpointPolicy()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.dp_rank = self.rank if dp_rank is None else dp_rank
        self.dp_size = self.world_size if dp_size is None else dp_size
        self.fault_hook = fault_hook or fault_hook_from_env()
        self.metrics = CheckpointMetrics()
        # Two dedicated gloo groups (torchtitan does the same for async saves): the background writer's collectives
        # (DCP planning, the manifest gather) must not interleave with the training loop's collectives, nor with
        # this manager's own main-thread ones (the time-based save decision, barriers, loads).
        # `timeout_s` bounds their collectives as the training group's are bounded (gloo's default is 30 minutes).
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        self._main_group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self._writer_group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self._cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-cleanup")
        self._cleanup: Future | None = None
        self._stager = ReusedBufferStager(overlap=self.policy.overlap_staging)
        self._pending: Future | None = None
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        if self._owns_dir:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.checkpoint_dir.glob(f"{RETIRED_PREFIX}*"):  # retired before a crash
                shutil.rmtree(leftover, ignore_errors=True)

    @property
    def _owns_dir(self) -> bool:
        """Whether this rank creates, replaces and retires checkpoint directories (rank 0 on shared storage)."""
        return self.local or self.rank == 0

    # ----- saving -----

    def maybe_save(self, step: int, state: TrainingState) -> bool:
        """Save if the policy says this step is due; True if a save was started."""
        due = bool(self.policy.every_steps) and step % self.policy.every_steps == 0
        if self.policy.every_seconds and not due:
            due_by_time = time.monotonic() - self._last_save_time >= self.policy.every_seconds
            if self.distributed:
                # Every rank must take part in the save: rank 0's clock decides for all.
                decision = [due_by_time]
                dist.broadcast_object_list(decision, src=0, group=self._main_group)
                due_by_time = bool(decision[0])
            due = due_by_time
        if not due or step == self._last_saved_step:
            return False
        self.save(step, state)
        return True

    def save(self, step: int, state: TrainingState, *, block: bool | None = None) -> None:
        """Checkpoint `state` as `step`; asynchronous per the policy unless `block` says otherwise.

        A save still in flight is waited for first (its time counts as blocking). A step this manager already saved
        (or loaded) is not written again, so a final save after `maybe_save` costs nothing. Raises CheckpointError
        if the previous background save failed.
        """
        started = time.perf_counter()
        self._wait_commit()
        if step == self._last_saved_step:
            return
        path = self.checkpoint_dir / checkpoint_name(step)
        if self._owns_dir and path.exists():
            # A torn (or superseded) attempt at the same step, from before a restart: it is rewritten whole.
            log.warning("checkpoint %s exists from an earlier attempt: replacing it", path)
            remove_checkpoint(path)
        self._barrier()
        state_dict = self._state_dict(state, step)
        writer = HashingFileSystemWriter(path, lambda phase: self._fault(phase, step), self.policy.writer_threads)
        info = {
            "step": step, "world_size": self.world_size, "dp_size": self.dp_size,
            "storage": "local" if self.local else "shared",
        }
        # Node-local: each rank's own DCP checkpoint of its local shards (no collective, no file of another rank).
        group, no_dist = (None, True) if self.local else (self._writer_group, not self.distributed)
        if self.local:
            state_dict = local_shards(state_dict)
        use_async = self.policy.async_save if block is None else not block
        if use_async:
            dcp_future = dcp.async_save(
                state_dict, storage_writer=writer, process_group=group, no_dist=no_dist, async_stager=self._stager
            )
            if isinstance(dcp_future, AsyncSaveResponse):  # an overlapped stage: the copies are still running
                dcp_future = dcp_future.upload_completion
            self._pending = self._executor.submit(self._commit, dcp_future, writer, path, info, started)
        else:
            dcp.save(state_dict, storage_writer=writer, process_group=group, no_dist=no_dist)
            self._commit(None, writer, path, info, started)
        blocking_s = time.perf_counter() - started
        self.metrics.last_blocking_s = blocking_s
        self.metrics.total_blocking_s += blocking_s
        self._last_save_time = time.monotonic()
        self._last_saved_step = step

    def before_update(self) -> None:
        """Call before changing the model or optimizer state (the optimizer step): waits until an overlapped async
        save's copy of the state is complete (at once when none is in flight); the wait counts as blocking time."""
        waited = self._stager.wait_staged()
        self.metrics.last_blocking_s += waited
        self.metrics.total_blocking_s += waited

    def wait(self) -> None:
        """Block until the save in flight (if any) has committed and retired checkpoints are deleted; re-raise a
        failed save here."""
        self._wait_commit()
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup.result()

    def _wait_commit(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last save and stop the background threads."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._cleaner.shutdown(wait=True)
            self._stager.close()

    @property
    def save_in_flight(self) -> bool:
        """True while an asynchronous save has not yet committed."""
        return self._pending is not None and not self._pending.done()

    def _commit(
        self, dcp_future: Future | None, writer: HashingFileSystemWriter, path: Path, info: dict, started: float
    ) -> None:
        """After DCP has written and fsynced every rank's files: gather their hashes, write the manifest on rank 0."""
        try:
            if dcp_future is not None:
                dcp_future.result()
            # Every rank reports the sizes and checksums of the files it wrote; rank 0 commits once all have.
            rank_files: list[dict] = [writer.fs.files]
            if self.distributed:
                rank_files = [{} for _ in range(self.world_size)]
                dist.all_gather_object(rank_files, writer.fs.files, group=self._writer_group)
            files = {name: entry for files_of_rank in rank_files for name, entry in files_of_rank.items()}
            total_bytes = sum(entry["bytes"] for files_of_rank in rank_files for entry in files_of_rank.values())
            self._fault("before_manifest", info["step"])
            manifest = None
            if self.rank == 0:
                info = {**info, "created_unix_s": time.time()}
                if self.local:
                    manifest = write_manifest(path, rank_files[0], {**info, "rank_files": rank_files})
                else:
                    manifest = write_manifest(path, files, info)
            self._fault("after_manifest", info["step"])
            self._after_commit(path, manifest)
        except (Exception, CheckpointException) as error:
            raise CheckpointError(f"saving checkpoint {path} failed: {describe_failure(error)}") from error
        save_s = time.perf_counter() - started
        self.metrics.saves += 1
        self.metrics.last_step = info["step"]
        self.metrics.last_save_s = save_s
        self.metrics.total_save_s += save_s
        self.metrics.last_bytes = total_bytes
        self.metrics.total_bytes += total_bytes

    def _fault(self, phase: str, step: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase, step)

    def _after_commit(self, path: Path, manifest: dict[str, Any] | None) -> None:
        """Retention, and on node-local storage a copy of rank 0's manifest beside every rank's files (the record
        that lets a later resume tell a lost checkpoint from a torn one)."""
        complete_steps = None
        if self.rank == 0:
            complete_steps = self._committed_steps()
        if self.local and self.distributed:
            box = [manifest, complete_steps]
            dist.broadcast_object_list(box, src=0, group=self._writer_group)
            manifest, complete_steps = box
            if self.rank != 0:
                write_manifest_copy(path, manifest)
        if complete_steps is None:
            return
        try:
            self._apply_retention(complete_steps)
        except OSError as error:  # the checkpoint is committed; failing to drop an old one must not fail it
            log.warning("checkpoint retention in %s failed (old checkpoints kept): %s", self.checkpoint_dir, error)

    def _committed_steps(self) -> list[int]:
        """Steps of this rank's checkpoint directories that hold a manifest, oldest first."""
        return [step for step, path in list_checkpoints(self.checkpoint_dir) if (path / MANIFEST_FILE).is_file()]

    def _apply_retention(self, complete_steps: list[int]) -> None:
        """Keep the newest `keep_last` complete checkpoints (as rank 0 sees them); drop older ones and torn
        leftovers older than them from this rank's directory."""
        if not complete_steps:
            return
        kept = complete_steps[-self.policy.keep_last :] if self.policy.keep_last else complete_steps
        oldest_kept, newest = kept[0], complete_steps[-1]
        retired = [
            moved
            for step, path in list_checkpoints(self.checkpoint_dir)
            if step < oldest_kept or (step < newest and step not in complete_steps)
            if (moved := retire_checkpoint(path)) is not None
        ]
        if retired:  # one cleanup thread: waiting for the latest deletion waits for all earlier ones
            self._cleanup = self._cleaner.submit(delete_all, retired)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._main_group)

    # ----- the state dict -----

    def _state_dict(self, state: TrainingState, step: int, *, for_load: bool = False) -> dict[str, Any]:
        """The flat-keyed dict DCP saves (or loads into). Per-rank values get rank-unique keys: DCP deduplicates
        equal keys across ranks and would hand one rank's value to all."""
        optimizers = [state.optimizer] if state.optimizer is not None else []
        model_sd, optim_sd = get_state_dict(state.model, optimizers, options=STATE_DICT_OPTIONS)
        result: dict[str, Any] = {"step": step, "model": model_sd}
        if optimizers:
            result["optimizer"] = optim_sd
        if state.lr_scheduler is not None:
            result["lr_scheduler"] = state.lr_scheduler.state_dict()
        for name, stateful in state.extra.items():
            result[f"extra.{name}"] = stateful.state_dict()
        if not for_load:
            result[f"rng.rank{self.rank}"] = rng_state()
            if state.data is not None:
                result[f"data.dp{self.dp_rank}"] = state.data.state_dict()
        return result

    # ----- loading -----

    def load_latest(self, state: TrainingState) -> int | None:
        """Load the newest checkpoint that verifies into `state` and return its step; None if there is none.

        A torn or corrupted checkpoint is reported in one warning line and the previous one is tried; checksums are
        verified while the checkpoint loads, so when no earlier one is left after a damaged one was partly loaded,
        that is an error rather than a start from step 0 with a half-loaded state.
        """
        self.wait()
        if self.local:
            return self._load_latest_local(state)
        candidates = list_checkpoints(self.checkpoint_dir) if self.rank == 0 else []
        if self.distributed:
            box = [candidates]
            dist.broadcast_object_list(box, src=0, group=self._main_group)
            candidates = box[0]
        partly_loaded = None
        for step, path in reversed(candidates):
            manifest, problem = self._check(path)
            if problem is None:
                try:
                    self.load(path, state, manifest)
                    return step
                except DamagedCheckpointError as error:
                    problem, partly_loaded = str(error), path
            if self.rank == 0:
                log.warning("checkpoint %s is unusable (%s): falling back to an earlier one", path, problem)
        if partly_loaded is not None:
            raise CheckpointError(f"checkpoint {partly_loaded} is damaged and no earlier one is usable")
        return None

    def _load_latest_local(self, state: TrainingState) -> int | None:
        """Node-local storage: rank 0's newest committed checkpoint, loaded by every rank from its own files.

        Never a silent fresh start: a checkpoint committed (by rank 0's manifest, or its copy on another rank) that
        is missing or damaged on some rank raises a CheckpointError naming the rank and the file.
        """
        committed = self._committed_steps()
        everyone = [(str(self.checkpoint_dir), committed)]
        if self.distributed:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, (str(self.checkpoint_dir), committed), group=self._main_group)
        newest = max(everyone[0][1], default=None)
        for rank, (directory, steps) in enumerate(everyone):
            if steps and (newest is None or steps[-1] > newest):
                raise CheckpointError(
                    f"node-local checkpoint {checkpoint_name(steps[-1])} was committed (rank {rank} holds it in "
                    f"{directory}) but rank 0 has no {checkpoint_name(steps[-1])}/{MANIFEST_FILE} in "
                    f"{everyone[0][0]}: rank 0's checkpoint files are missing"
                )
        if newest is None:
            return None
        path = self.checkpoint_dir / checkpoint_name(newest)
        box = [read_manifest(path) if self.rank == 0 else None]
        if self.distributed:
            dist.broadcast_object_list(box, src=0, group=self._main_group)
        manifest = box[0]
        problem = None
        if manifest["world_size"] != self.world_size:
            problem = (f"saved on {manifest['world_size']} ranks, this job has {self.world_size}: node-local "
                       "checkpoints resume on the same layout (use shared storage to reshard)")
        else:
            try:
                check_before_load(path, files_to_verify(manifest, self.rank, self.world_size), manifest["checksum"])
            except CheckpointError as error:
                problem = f"{error} in {path}"
        failed = self._gather_problems(problem)
        if failed:
            raise CheckpointError(f"node-local checkpoint {checkpoint_name(newest)} is unusable: {failed}")
        try:
            self.load(path, state, manifest)
        except DamagedCheckpointError as error:  # no earlier checkpoint is tried: the state is partly loaded
            raise CheckpointError(f"node-local {error}") from None
        return newest

    def _raise_if_damaged(self, reader: VerifyingFileSystemReader, path: Path, manifest: dict[str, Any]) -> None:
        """A DamagedCheckpointError on every rank if any rank's share failed its checksum (a collective)."""
        problems = reader.fs.verify_rest(path)
        damage = self._gather_problems("; ".join(f"{problem} in {path}" for problem in problems) or None)
        if damage:
            raise DamagedCheckpointError(f"checkpoint {checkpoint_name(int(manifest['step']))} is damaged: {damage}")

    def _gather_problems(self, problem: str | None) -> str | None:
        """Every rank's problem (None: none), as one line naming the ranks; None if no rank has one."""
        problems = [problem]
        if self.distributed:
            problems = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self._main_group)
        failed = [f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None]
        return "; ".join(failed) or None

    def _check(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """The manifest, and the first problem any rank found in it or in the presence and sizes of its share of
        the files (None if none); the same verdict on every rank. Checksums are verified while loading."""
        problem: str | None = None
        manifest: dict[str, Any] | None = None
        try:
            manifest = read_manifest(path)
            check_before_load(path, files_to_verify(manifest, self.rank, self.world_size), manifest["checksum"])
        except CheckpointError as error:
            problem = str(error)
        except OSError as error:
            problem = f"unreadable: {error}"
        if self.distributed:
            problems: list[str | None] = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self._main_group)
            problem = next((p for p in problems if p is not None), None)
        return manifest, problem

    def load(self, path: Path, state: TrainingState, manifest: dict[str, Any] | None = None) -> int:
        """Load one checkpoint directory into `state` (any world size or layout DCP can reshard to); its step."""
        self._stager.wait_staged()  # an overlapped save must have copied the state before it is overwritten
        started = time.perf_counter()
        path = Path(path)
        manifest = manifest or read_manifest(path)
        saved_dp, saved_world = manifest["dp_size"], manifest["world_size"]
        saved_storage, storage = manifest.get("storage", "shared"), "local" if self.local else "shared"
        if saved_storage != storage:
            raise CheckpointError(f"checkpoint {path} was saved with checkpoint.storage={saved_storage!r}; this "
                                  f"run has {storage!r}: resume with the same setting")
        to_load = self._state_dict(state, manifest["step"], for_load=True)
        # RNG streams belong to ranks: restored only when the world is the same shape, else left as seeded.
        same_world = saved_world == self.world_size
        if same_world:
            to_load[f"rng.rank{self.rank}"] = rng_state()
        if state.data is not None:
            # The data position must be exact; with another data-parallel size it carries over only if every saved
            # data-parallel rank was at the same position (true of WindowSampler, which tracks the global batch).
            dp_keys = [self.dp_rank] if saved_dp == self.dp_size else list(range(saved_dp))
            for dp in dp_keys:
                to_load[f"data.dp{dp}"] = state.data.state_dict()
        mine = data_files(files_to_verify(manifest, self.rank, self.world_size))
        reader = VerifyingFileSystemReader(path, mine, manifest["checksum"])
        try:
            if self.local:
                if not same_world:
                    raise CheckpointError(f"node-local, saved on {saved_world} ranks: resume on the same layout")
                loaded = local_shards(to_load)
                dcp.load(loaded, storage_reader=reader, no_dist=True)
                take_loaded_values(to_load, loaded)
            else:
                dcp.load(to_load, storage_reader=reader, process_group=self._main_group, no_dist=not self.distributed)
        except (Exception, CheckpointException) as error:
            self._raise_if_damaged(reader, path, manifest)  # damaged bytes can break torch.load before the checksum
            raise CheckpointError(
                f"checkpoint {path} (world size {saved_world}) does not fit this model/layout "
                f"(world size {self.world_size}): {describe_failure(error)}"
            ) from error
        # Every rank checksummed its share while DCP read it; nothing is applied from a damaged checkpoint.
        self._raise_if_damaged(reader, path, manifest)
        optimizers = [state.optimizer] if state.optimizer is not None else []
        set_state_dict(
            state.model,
            optimizers,
            model_state_dict=to_load["model"],
            optim_state_dict=to_load.get("optimizer", {}),
            options=STATE_DICT_OPTIONS,
        )
        if state.lr_scheduler is not None:
            state.lr_scheduler.load_state_dict(to_load["lr_scheduler"])
        for name, stateful in state.extra.items():
            stateful.load_state_dict(to_load[f"extra.{name}"])
        if state.data is not None:
            positions = [to_load[f"data.dp{dp}"] for dp in dp_keys]
            if any(position != positions[0] for position in positions):
                raise CheckpointError(
                    f"checkpoint {path} was saved on {saved_dp} data-parallel ranks at different data positions "
                    f"({positions}); it cannot be resumed exactly on {self.dp_size}"
                )
            state.data.load_state_dict(positions[0])
        if same_world:
            set_rng_state(to_load[f"rng.rank{self.rank}"])
        elif self.rank == 0:
            log.info("checkpoint %s: saved on %d ranks, loaded on %d; RNG states not restored", path, saved_world,
                     self.world_size)
        self.metrics.load_s = time.perf_counter() - started
        self._last_saved_step = manifest["step"]
        return int(manifest["step"])


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMetrics",
    "CheckpointPolicy",
    "Goodput",
    "Stateful",
    "TrainingState",
    "checkpoint_name",
    "effective_training_time_ratio",
    "list_checkpoints",
]
