"""The raw tensor format of checkpoint data files (checkpoint/raw_format.py): bytes as in memory, read into place.

Round trip of every dtype the trainer saves (fp32, bf16, int64, bool, 0-d, empty), a load into a strided or
wider destination, the checksums the writer records equal the files' bytes, a
checkpoint written through torch.save (DCP's own format) still loads, and DCP's own reader refuses a raw file
instead of misreading it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from aiinfra.checkpoint.commit import (
    CHECKSUM,
    HashingFileSystemWriter,
    VerifyingFileSystemReader,
    checksum_file,
    data_files,
)
from aiinfra.checkpoint.raw_format import RAW_DESCRIPTOR, split_items


def state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 33, generator=generator),
        "half": torch.randn(17, 5, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(100, dtype=torch.int64),
        "mask": torch.rand(40, generator=generator) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "step": 7,
        "blob": io.BytesIO(b"not a tensor"),
    }


def save(path: Path, raw: bool) -> HashingFileSystemWriter:
    writer = HashingFileSystemWriter(path, lambda phase: None, thread_count=2, raw=raw)
    dcp.save(state(), storage_writer=writer, no_dist=True)
    return writer


def zeros_like_state() -> dict:
    return {name: torch.zeros_like(value) if isinstance(value, torch.Tensor) else value
            for name, value in state().items() if name != "blob"} | {"step": 0}


def load(path: Path, writer: HashingFileSystemWriter, into: dict) -> VerifyingFileSystemReader:
    reader = VerifyingFileSystemReader(path, data_files(writer.fs.files), CHECKSUM)
    dcp.load(into, storage_reader=reader, no_dist=True)
    assert reader.fs.verify_rest(path) == []
    return reader


@pytest.mark.parametrize("raw", [True, False])
def test_raw_and_torch_save_checkpoints_round_trip_every_dtype(tmp_path: Path, raw: bool) -> None:
    writer = save(tmp_path, raw)
    descriptors = {tuple(info.transform_descriptors or ()) for info in dcp.FileSystemReader(tmp_path)
                   .read_metadata().storage_data.values()}
    assert ((RAW_DESCRIPTOR,) in descriptors) == raw
    for name, entry in writer.fs.files.items():  # what the manifest will list is what is on disk
        assert (tmp_path / name).stat().st_size == entry["bytes"]
        assert checksum_file(tmp_path / name) == entry[CHECKSUM]
    loaded = zeros_like_state()
    load(tmp_path, writer, loaded)
    expected = state()
    for name, value in loaded.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
    assert loaded["step"] == 7


def test_a_raw_tensor_loads_into_a_strided_or_other_dtype_destination(tmp_path: Path) -> None:
    # Where the destination cannot take the bytes as they are (a transposed view, another dtype), the stored chunk
    # is read into a buffer and copied in, as DCP's own reader does. (Reads of part of a stored chunk, a reshard,
    # are covered under torchrun in test_distributed.py.)
    writer = save(tmp_path, raw=True)
    strided = torch.zeros(33, 64).t()
    widened = torch.zeros(17, 5, dtype=torch.float32)
    load(tmp_path, writer, {"w": strided, "half": widened})
    assert not strided.is_contiguous() and torch.equal(strided, state()["w"])
    assert torch.equal(widened, state()["half"].float())


def test_dcp_own_reader_refuses_a_raw_file_instead_of_misreading_it(tmp_path: Path) -> None:
    save(tmp_path, raw=True)
    with pytest.raises(CheckpointException) as refused:
        dcp.load({"w": torch.zeros(64, 33)}, storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)
    assert "Unknown extension" in str(refused.value.failures) and RAW_DESCRIPTOR.split("/")[0] in str(
        refused.value.failures)


def test_items_are_split_into_files_of_about_equal_bytes() -> None:
    class Item:
        def __init__(self, size: int | None):
            from torch.distributed.checkpoint.planner import WriteItemType

            self.type = WriteItemType.TENSOR if size else WriteItemType.BYTE_IO
            self.tensor_data = None
            if size:
                from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties
                from torch.distributed.checkpoint.planner import TensorWriteData

                self.tensor_data = TensorWriteData(ChunkStorageMetadata(torch.Size([0]), torch.Size([size])),
                                                   TensorProperties(dtype=torch.float32), torch.Size([size]))

    items = [Item(size) for size in (100, 60, 50, 40, 10)] + [Item(None), Item(None)]
    buckets = split_items(items, 2)
    weights = sorted(sum(4 * i.tensor_data.size.numel() for i in bucket if i.tensor_data) for bucket in buckets)
    assert sum(weights) == 1040 and weights[1] - weights[0] <= 4 * 100  # within the largest item (greedy LPT)
    assert weights == [480, 560] and sum(len(bucket) for bucket in buckets) == len(items)
    assert len(split_items(items[:1], 4)) == 1  # no empty files
