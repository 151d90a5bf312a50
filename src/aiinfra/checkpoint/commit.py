"""The commit protocol on top of DCP: hashed data files, a manifest written last, verification, fault injection.

A checkpoint directory counts only when its `manifest.json` exists and every file it lists has the listed size and
sha256. DCP writes and fsyncs the data files and renames `.metadata` into place; we hash every byte as DCP writes
it (no second read), then write the manifest atomically (temporary file, fsync, rename) and fsync the directory,
which DCP does not do. Anything else (no manifest, a missing, short or altered file) is a torn checkpoint.

Fault injection for tests and demos: `AIINFRA_CHECKPOINT_FAULT=<phase>:<kill|pause>[@<step>]` SIGKILLs the writing
process (or pauses it forever, for an outside kill) when a save reaches one of `FAULT_PHASES`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from aiinfra.checkpoint.run_dir import atomic_write

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "aiinfra-checkpoint/1"
DCP_METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"
FAULT_ENV = "AIINFRA_CHECKPOINT_FAULT"
FAULT_PHASES = ("before_data", "mid_data", "before_manifest", "after_manifest")
HASH_CHUNK_BYTES = 8 << 20
FLUSH_BEHIND_BYTES = 32 << 20

FaultHook = Callable[[str, int], None]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names the checkpoint and the reason."""


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range back to disk without waiting for it.
    None where the C library lacks it (the final fsync then does all the work)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    write_flag = 2  # SYNC_FILE_RANGE_WRITE

    def writeback(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, write_flag)  # advisory: a failure only leaves the work to fsync

    return writeback


start_writeback = _load_sync_file_range()


def fault_hook_from_env(environ: dict[str, str] | None = None) -> FaultHook | None:
    """The hook described by AIINFRA_CHECKPOINT_FAULT, or None when it is unset."""
    spec = (environ if environ is not None else os.environ).get(FAULT_ENV, "").strip()
    if not spec:
        return None
    target, _, step_text = spec.partition("@")
    phase, _, action = target.partition(":")
    if phase not in FAULT_PHASES or action not in ("kill", "pause") or (step_text and not step_text.isdigit()):
        raise CheckpointError(
            f"{FAULT_ENV}={spec!r}: expected <phase>:<kill|pause>[@<step>] with phase one of {', '.join(FAULT_PHASES)}"
        )
    only_step = int(step_text) if step_text else None

    def hook(reached: str, step: int) -> None:
        if reached != phase or (only_step is not None and step != only_step):
            return
        print(f"checkpoint fault: {action} at {phase} of step {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # paused for an outside SIGKILL
            time.sleep(3600)

    return hook


class _HashingStream(io.RawIOBase):
    """A write-only file that hashes every byte on its way to disk and can fire the mid-data fault.

    Flush-behind: every FLUSH_BEHIND_BYTES it asks the kernel to start writing the bytes so far back to disk, so the
    disk works while this thread hashes and serializes the next ones, and the closing fsync finds little left to do
    (the same idea as RocksDB's bytes_per_sync). Without it the whole file is written back only at the fsync.
    """

    def __init__(self, raw: io.BufferedWriter, on_second_write: Callable[[], None] | None):
        super().__init__()
        self.raw = raw
        self.digest = hashlib.sha256()
        self.bytes_written = 0
        self._writes = 0
        self._on_second_write = on_second_write
        self._written_back = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        written = self.raw.write(view)
        self.bytes_written += len(view)
        self._writes += 1
        if start_writeback is not None and self.bytes_written - self._written_back >= FLUSH_BEHIND_BYTES:
            self.raw.flush()
            start_writeback(self.raw.fileno(), self._written_back, self.bytes_written - self._written_back)
            self._written_back = self.bytes_written
        if self._writes == 2 and self._on_second_write is not None:
            # Part of the file is on disk and part is not: the "middle of the data" phase of a torn write.
            self.raw.flush()
            self._on_second_write()
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        if not self.raw.closed:
            self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class HashingFileSystem(FileSystem):
    """DCP's local file system, recording (size, sha256) of every file it writes."""

    def __init__(self, fault: Callable[[str], None]):
        super().__init__()
        self.files: dict[str, dict[str, Any]] = {}
        self._fault = fault
        self._data_started = False
        self._lock = threading.Lock()  # DCP's writer threads share this file system

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        if "w" not in mode:
            with path.open(mode) as stream:
                yield stream
            return
        is_data = path.name.endswith(DATA_SUFFIX)
        with self._lock:
            first_data_file = is_data and not self._data_started
            self._data_started |= is_data
        if first_data_file:
            self._fault("before_data")
        with path.open(mode) as raw:
            stream = _HashingStream(raw, (lambda: self._fault("mid_data")) if is_data else None)
            yield stream
            # DCP writes `.metadata.tmp` and renames it: record the final name.
            name = path.name.removesuffix(".tmp")
            self.files[name] = {"bytes": stream.bytes_written, "sha256": stream.digest.hexdigest()}


class HashingFileSystemWriter(FileSystemWriter):
    """DCP's FileSystemWriter (fsync on) whose files are hashed as they are written.

    Two writer threads per rank, each with its own file: one thread's sha256 and serialization overlap the other's
    disk writes (hashing alone runs at about the disk's speed here, so one thread would nearly halve throughput).
    """

    def __init__(self, path: Path, fault: Callable[[str], None], thread_count: int = 2):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
        self.fs = HashingFileSystem(fault)


def write_manifest(checkpoint_path: Path, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Commit a checkpoint: write its manifest atomically, then fsync its directory and the parent."""
    if DCP_METADATA_FILE not in files:
        raise CheckpointError(f"{checkpoint_path}: DCP wrote no {DCP_METADATA_FILE}; refusing to commit")
    manifest = {
        "format": MANIFEST_FORMAT,
        **info,
        "total_bytes": sum(entry["bytes"] for entry in files.values()),
        "files": dict(sorted(files.items())),
    }
    atomic_write(checkpoint_path / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    fsync_dir(checkpoint_path)
    fsync_dir(checkpoint_path.parent)
    return manifest


def write_manifest_copy(checkpoint_path: Path, manifest: dict[str, Any]) -> None:
    """Node-local storage: rank 0's manifest, written beside another rank's files once rank 0 has committed."""
    atomic_write(checkpoint_path / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    fsync_dir(checkpoint_path)


def read_manifest(checkpoint_path: Path) -> dict[str, Any]:
    """The parsed manifest; a CheckpointError saying what is wrong if it is missing or unreadable."""
    path = checkpoint_path / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"incomplete: no {MANIFEST_FILE} (the writer stopped before the commit)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"corrupted {MANIFEST_FILE}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise CheckpointError(f"{MANIFEST_FILE} is not an {MANIFEST_FORMAT} manifest")
    return manifest


def verify_files(checkpoint_path: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Check the size and sha256 of `names` (a subset of the manifest's files) against the manifest."""
    for name in names:
        expected = manifest["files"][name]
        path = checkpoint_path / name
        if not path.is_file():
            raise CheckpointError(f"missing file {name}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        digest = sha256_file(path)
        if digest != expected["sha256"]:
            raise CheckpointError(f"{name}: sha256 {digest[:12]}… is not the manifest's {expected['sha256'][:12]}…")
