"""The commit protocol on top of DCP: checksummed data files, a manifest written last, verification, fault injection.

A checkpoint directory counts only when its `manifest.json` exists and every file it lists has the listed size and
checksum. DCP writes and fsyncs the data files and renames `.metadata` into place; we checksum every byte as DCP
writes it (no second read), then write the manifest atomically (temporary file, fsync, rename) and fsync the
directory, which DCP does not do. Anything else (no manifest, a missing, short or altered file) is a torn checkpoint.

The checksum is XXH3-128 (`xxhash`), chosen by measurement on this machine (one thread, 8 MiB chunks): sha256
0.6 GB/s, BLAKE3 2.2-4.3 GB/s, CRC32C (google-crc32c) 5.2-5.8 GB/s, XXH3-128 3.9-7.8 GB/s, against a disk that
writes 0.9-2.6 GB/s: sha256 could not keep up with the disk, XXH3 does with room to spare. It detects corruption
(a flipped bit, a torn or swapped file), not tampering: it is not a cryptographic hash. The manifest names the
algorithm; manifests of format 1 (sha256) still verify.

Loading verifies as it reads (`VerifyingFileSystemReader`): each rank checksums the files it is assigned while DCP
reads them, so every byte comes from the disk once.

Fault injection for tests and demos: `AIINFRA_CHECKPOINT_FAULT=<phase>:<kill|pause>[@<step>]` SIGKILLs the writing
process (or pauses it forever, for an outside kill) when a save reaches one of `FAULT_PHASES`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from aiinfra.checkpoint.raw_format import ChunkShapes, is_raw_file, read_file, write_files
from aiinfra.checkpoint.run_dir import atomic_write

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "aiinfra-checkpoint/2"
READABLE_FORMATS = ("aiinfra-checkpoint/1", MANIFEST_FORMAT)
CHECKSUM = "xxh3_128"
CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DCP_METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"
FAULT_ENV = "AIINFRA_CHECKPOINT_FAULT"
FAULT_PHASES = ("before_data", "mid_data", "before_manifest", "after_manifest")
HASH_CHUNK_BYTES = 8 << 20
FLUSH_BEHIND_BYTES = 32 << 20

FaultHook = Callable[[str, int], None]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names the checkpoint and the reason."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files did not match their checksums while it was loaded."""


def describe_failure(error: BaseException) -> str:
    """One line per failing rank instead of DCP's CheckpointException with every rank's traceback."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {failure[0]}" for rank, failure in sorted(error.failures.items()))
    return str(error)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum_file(path: Path, algorithm: str = CHECKSUM) -> str:
    """Hex checksum of a file's bytes, read in large chunks."""
    digest = CHECKSUMS[algorithm]()
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
        self.digest = CHECKSUMS[CHECKSUM]()
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
    """DCP's local file system, recording (size, checksum) of every file it writes."""

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
            self.files[name] = {"bytes": stream.bytes_written, CHECKSUM: stream.digest.hexdigest()}


class HashingFileSystemWriter(FileSystemWriter):
    """DCP's FileSystemWriter (fsync on) whose files are hashed as they are written, tensors as raw bytes
    (`raw_format`) unless `raw` is False (then through torch.save, as DCP writes them).

    Two writer threads per rank, each with its own file: one thread's checksum overlaps the other's disk writes.
    """

    def __init__(self, path: Path, fault: Callable[[str], None], thread_count: int = 2, raw: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
        self.fs = HashingFileSystem(fault)
        self.raw = raw

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if not self.raw:
            return super().write_data(plan, planner)
        results = write_files(self.fs, Path(self.path), plan.storage_data.prefix, plan.items, planner,
                              self.thread_count, self.sync_files, DATA_SUFFIX)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


def write_manifest(checkpoint_path: Path, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Commit a checkpoint: write its manifest atomically, then fsync its directory and the parent."""
    if DCP_METADATA_FILE not in files:
        raise CheckpointError(f"{checkpoint_path}: DCP wrote no {DCP_METADATA_FILE}; refusing to commit")
    manifest = {
        "format": MANIFEST_FORMAT,
        "checksum": CHECKSUM,
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
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS or "files" not in manifest:
        raise CheckpointError(f"{MANIFEST_FILE} is not an {MANIFEST_FORMAT} manifest")
    manifest.setdefault("checksum", "sha256")  # format 1
    if manifest["checksum"] not in CHECKSUMS:
        raise CheckpointError(f"{MANIFEST_FILE}: unknown checksum {manifest['checksum']!r}")
    return manifest


def check_presence(checkpoint_path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every file of `files` (name -> manifest entry) exists with the listed size: a cheap check before loading."""
    for name, expected in files.items():
        path = checkpoint_path / name
        if not path.is_file():
            raise CheckpointError(f"missing file {name}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")


def data_files(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The DCP data files among `files` (name -> manifest entry)."""
    return {name: entry for name, entry in files.items() if name.endswith(DATA_SUFFIX)}


def verify_checksums(checkpoint_path: Path, files: dict[str, dict[str, Any]], algorithm: str) -> None:
    """Read and checksum each of `files` whole; a CheckpointError naming the first that does not match."""
    for name, expected in files.items():
        problem = checksum_problem(name, checksum_file(checkpoint_path / name, algorithm), expected, algorithm)
        if problem:
            raise CheckpointError(problem)


def check_before_load(checkpoint_path: Path, files: dict[str, dict[str, Any]], algorithm: str) -> None:
    """What is checked before a load: every file of this rank's share is there with its size, and the small files
    (DCP's .metadata, which every rank reads before any data) match their checksums. The data files are checksummed
    while they load."""
    check_presence(checkpoint_path, files)
    small = {name: entry for name, entry in files.items() if not name.endswith(DATA_SUFFIX)}
    verify_checksums(checkpoint_path, small, algorithm)


def files_to_verify(manifest: dict[str, Any], rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """The files (name -> manifest entry) `rank` checks: on node-local storage, those it wrote; on shared storage
    with the same world, those it wrote (rank 0 also the .metadata), which it reads anyway; else an even share."""
    if manifest.get("storage") == "local":
        return manifest["rank_files"][rank]
    files = manifest["files"]
    if manifest["world_size"] == world_size:
        return {
            name: entry
            for name, entry in files.items()
            if name.startswith(f"__{rank}_") or (rank == 0 and not name.startswith("__"))
        }
    return {name: files[name] for name in sorted(files)[rank::world_size]}


def checksum_problem(name: str, digest: str, expected: dict[str, Any], algorithm: str) -> str | None:
    """None if `digest` is the manifest's, else the line that says it is not."""
    if digest == expected[algorithm]:
        return None
    return f"{name}: {algorithm} {digest[:12]}… is not the manifest's {expected[algorithm][:12]}…"


class _VerifyingReader(io.RawIOBase):
    """A read-only file that checksums every byte once, in file order, whatever order it is read in.

    A read past what was checksummed first reads and checksums the gap (DCP reads a file's items in offset order,
    so the gaps are torch.load's look at a record's end); bytes read again (torch.load seeking back within an item
    it has just read) come from the page cache and are not checksummed twice.
    """

    def __init__(self, raw: io.FileIO, algorithm: str):
        super().__init__()
        self.raw = raw
        self.digest = CHECKSUMS[algorithm]()
        self.checksummed = 0
        self.position = 0
        self._chunk: memoryview | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = self.raw.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        self._checksum_to(self.position)
        self.raw.seek(self.position)
        count = self.raw.readinto(buffer)
        end = self.position + count
        if end > self.checksummed:
            self.digest.update(memoryview(buffer).cast("B")[self.checksummed - self.position : count])
            self.checksummed = end
        self.position = end
        return count

    def _checksum_to(self, target: int) -> None:
        if target <= self.checksummed:
            return
        self.raw.seek(self.checksummed)
        if self._chunk is None:  # one buffer, reused: a fresh 8 MiB per read costs page faults
            self._chunk = memoryview(bytearray(HASH_CHUNK_BYTES))
        while self.checksummed < target:
            count = self.raw.readinto(self._chunk[: min(HASH_CHUNK_BYTES, target - self.checksummed)])
            if not count:
                return
            self.digest.update(self._chunk[:count])
            self.checksummed += count

    def finish(self) -> str:
        """Checksum the rest of the file; its hex digest."""
        self._checksum_to(os.fstat(self.raw.fileno()).st_size)
        return self.digest.hexdigest()


class VerifyingFileSystem(FileSystem):
    """DCP's local file system for loading: the files in `expected` (data files) are checksummed as DCP reads them."""

    def __init__(self, expected: dict[str, dict[str, Any]], algorithm: str):
        super().__init__()
        self.expected = expected
        self.algorithm = algorithm
        self.verified: set[str] = set()
        self.problems: list[str] = []
        self._lock = threading.Lock()  # the reader's threads share it

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        name = path.name
        if "r" not in mode or name not in self.expected or name in self.verified:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with open(path, "rb", buffering=0) as raw:
            # The whole file will be read: let the kernel read ahead while DCP deserializes and copies what arrived.
            os.posix_fadvise(raw.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            stream = _VerifyingReader(raw, self.algorithm)
            yield stream
            problem = checksum_problem(name, stream.finish(), self.expected[name], self.algorithm)
        with self._lock:
            self.verified.add(name)
            if problem:
                self.problems.append(problem)

    def verify_rest(self, checkpoint_path: Path) -> list[str]:
        """Checksum the expected files that the load did not read whole or at all (other ranks' files after a
        reshard, a file whose read failed); every problem found, in the load and here."""
        for name in sorted(set(self.expected) - self.verified):
            problem = checksum_problem(name, checksum_file(checkpoint_path / name, self.algorithm),
                                       self.expected[name], self.algorithm)
            if problem:
                self.problems.append(problem)
            self.verified.add(name)
        return self.problems


class VerifyingFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader over a `VerifyingFileSystem`, reading each file's items in offset order, and
    `thread_count` files at a time (as the writer wrote them): one thread's deserialization and copies overlap
    another's reads and checksums, which one thread alone leaves the disk idle for."""

    def __init__(self, path: Path, expected: dict[str, dict[str, Any]], algorithm: str, thread_count: int = 2):
        super().__init__(path)
        self.fs = VerifyingFileSystem(expected, algorithm)
        self.thread_count = thread_count
        self.shapes: ChunkShapes | None = None

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.shapes = ChunkShapes(metadata)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)

        def read_one(name: str, items: list[Any]) -> None:
            if is_raw_file(items, self.storage_data):
                assert self.shapes is not None
                read_file(self.fs, Path(self.path) / name, items, self.storage_data, self.shapes, planner)
                return
            items = sorted(items, key=lambda item: self.storage_data[item.storage_index].offset)
            FileSystemReader.read_data(self, dataclasses.replace(plan, items=items), planner).wait()

        with ThreadPoolExecutor(max_workers=max(1, min(self.thread_count, len(per_file)))) as pool:
            for done in [pool.submit(read_one, name, items) for name, items in per_file.items()]:
                done.result()
        finished: Future[None] = Future()
        finished.set_result(None)
        return finished
