"""Tensor bytes on disk as they are in memory: DCP's files without torch.save's framing, read straight into place.

DCP's FileSystemWriter pickles every tensor with torch.save (a zip record per item, and a copy of its bytes through
the serializer), and its reader torch.loads each item into a new tensor, then copies that into the model: on one
CPU core that costs about as long as the disk takes to write or read the bytes. Here a tensor item is its
contiguous bytes, written from the tensor's own memory, and read back with `readinto` straight into the tensor it
restores when the stored chunk is the whole of it (the same layout resumed), else into one buffer that is narrowed
and copied (a reshard). The file layout, `.metadata` and planners are DCP's own; each tensor item's storage info
carries the descriptor `RAW_DESCRIPTOR`, so a reader that does not know the format (DCP's own FileSystemReader)
refuses the item instead of misreading it, and checkpoints written by torch.save still load.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

RAW_DESCRIPTOR = "aiinfra-raw-tensor/1"


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _item_bytes(item: Any) -> int:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    return item.tensor_data.size.numel() * item.tensor_data.properties.dtype.itemsize


def split_items(items: list[Any], bins: int) -> list[list[Any]]:
    """The items in `bins` groups of about equal bytes (largest first, each to the lightest group); one file each."""
    buckets: list[list[Any]] = [[] for _ in range(max(1, bins))]
    sizes = [0] * len(buckets)
    for index, item in enumerate(i for i in items if i.type == WriteItemType.BYTE_IO):
        buckets[index % len(buckets)].append(item)
    for item in sorted((i for i in items if i.type != WriteItemType.BYTE_IO), key=_item_bytes, reverse=True):
        lightest = sizes.index(min(sizes))
        buckets[lightest].append(item)
        sizes[lightest] += _item_bytes(item)
    return [bucket for bucket in buckets if bucket]


def write_file(fs: FileSystem, path: Path, name: str, items: Iterable[Any], planner: SavePlanner,
               fsync: bool) -> list[WriteResult]:
    """Write `items` into one file, byte items first, each tensor's bytes from its own memory; fsync it."""
    results = []
    ordered = sorted(items, key=lambda item: item.type != WriteItemType.BYTE_IO)
    with fs.create_stream(path, "wb") as stream:
        offset = 0
        for item in ordered:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                view, descriptors = data.getbuffer(), None
            else:
                tensor = data.detach()
                if tensor.device.type != "cpu":
                    tensor = tensor.cpu()
                view, descriptors = _byte_view(tensor.contiguous()), [RAW_DESCRIPTOR]
            stream.write(view)
            length = view.nbytes
            results.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(name, offset, length,
                                                                 transform_descriptors=descriptors)))
            offset += length
        stream.flush()
        if fsync:
            os.fsync(stream.fileno())
    return results


def write_files(fs: FileSystem, root: Path, prefix: str, items: list[Any], planner: SavePlanner, threads: int,
                fsync: bool, suffix: str) -> list[WriteResult]:
    """One file per thread (`<prefix><n><suffix>`, DCP's names), written in parallel."""
    buckets = split_items(items, threads)
    names = [f"{prefix}{index}{suffix}" for index in range(len(buckets))]
    with ThreadPoolExecutor(max_workers=max(1, len(buckets))) as pool:
        done = [pool.submit(write_file, fs, root / name, name, bucket, planner, fsync)
                for name, bucket in zip(names, buckets)]
        return [result for future in done for result in future.result()]


def is_raw_file(items: list[ReadItem], storage_data: dict[Any, _StorageInfo]) -> bool:
    """True when the file these items come from was written here (its tensor items carry the raw descriptor)."""
    return any(RAW_DESCRIPTOR in (storage_data[item.storage_index].transform_descriptors or ()) for item in items)


def _read_exactly(stream: io.RawIOBase, view: memoryview, name: str) -> None:
    done = 0
    while done < view.nbytes:
        count = stream.readinto(view[done:])
        if not count:
            raise OSError(f"{name}: ended {view.nbytes - done} bytes early (truncated?)")
        done += count


class ChunkShapes:
    """The stored shape and dtype of every tensor chunk of a checkpoint, from DCP's metadata."""

    def __init__(self, metadata: Metadata):
        self.metadata = metadata
        self._chunks: dict[tuple[str, tuple[int, ...]], torch.Size] = {}

    def of(self, item: ReadItem) -> tuple[torch.Size, torch.dtype]:
        fqn = item.storage_index.fqn
        entry = self.metadata.state_dict_metadata[fqn]
        if not isinstance(entry, TensorStorageMetadata):
            raise TypeError(f"{fqn}: a tensor read of a non-tensor entry")
        key = (fqn, tuple(item.storage_index.offset or ()))
        if key not in self._chunks:
            for chunk in entry.chunks:
                self._chunks[(fqn, tuple(chunk.offsets))] = chunk.sizes
        return self._chunks[key], entry.properties.dtype


def read_file(fs: FileSystem, path: Path, items: list[ReadItem], storage_data: dict[Any, _StorageInfo],
              shapes: ChunkShapes, planner: LoadPlanner) -> None:
    """Read one raw file's items, in offset order, each tensor straight into its destination where it can be."""
    ordered = sorted(items, key=lambda item: storage_data[item.storage_index].offset)
    with fs.create_stream(path, "rb") as stream:
        for item in ordered:
            info = storage_data[item.storage_index]
            stream.seek(info.offset)
            if item.type == LoadItemType.BYTE_IO:
                buffer = bytearray(info.length)
                _read_exactly(stream, memoryview(buffer), path.name)
                planner.load_bytes(item, io.BytesIO(buffer))
                continue
            sizes, dtype = shapes.of(item)
            target = planner.resolve_tensor(item).detach()
            whole = all(offset == 0 for offset in item.storage_offsets) and tuple(item.lengths) == tuple(sizes)
            if (whole and target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
                    and target.numel() * dtype.itemsize == info.length):
                _read_exactly(stream, _byte_view(target), path.name)
            else:
                stored = torch.empty(sizes, dtype=dtype)
                if stored.numel() * dtype.itemsize != info.length:
                    raise OSError(f"{path.name}: item {item.storage_index.fqn} holds {info.length} bytes, its "
                                  f"shape {tuple(sizes)} of {dtype} needs {stored.numel() * dtype.itemsize}")
                _read_exactly(stream, _byte_view(stored), path.name)
                piece = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
                if target.size() != piece.size():
                    raise ValueError(f"{item.storage_index.fqn}: stored {tuple(piece.size())}, the model has "
                                     f"{tuple(target.size())}")
                target.copy_(piece)
            planner.commit_tensor(item, target)
