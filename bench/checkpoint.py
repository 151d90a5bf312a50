"""How fast a checkpoint is written and read back, against what this disk can do, and how little of it blocks
training.

Workload: a Llama-style model (default dim 768, 4 layers, 8192-token vocabulary: 50M parameters) with its AdamW
state, one process: 604 MB per checkpoint (weights, two Adam moments, step, RNG, scheduler).
Baselines, measured in the same run and in the same directory, each writing the same number of bytes sequentially
in 8 MiB blocks from one thread, then fsync: (1) dd-style, what `dd bs=8M conv=fsync` measures; (2) the same write
with flush-behind (sync_file_range every 32 MiB, as our checkpoint writer does), which on this VM's disk is faster
and is the stricter yardstick. For resume, the baseline is reading the checkpoint's files once, sequentially in
8 MiB blocks, from a cold page cache (each file's cached pages are dropped first with posix_fadvise DONTNEED, so
both reads come from the disk); the resume is `load_latest` into a trainer's state (manifest, checks, DCP load with
the checksums verified while reading, state restored), from the same cold cache. They alternate in rounds
(synchronous save, both raw writes, DCP's own writer without our checksums and manifest, asynchronous save, cold
read, resume) so that the noise of this shared machine hits all alike; medians are compared. The deletion of the
checkpoint that retention drops runs in the background and is not timed.

The asynchronous save is measured as a trainer meets it: `save()` returns once the state's structure is taken, its
staging copy runs beside the next step's forward and backward pass (--step-tokens tokens; it reads the weights and
changes none), and `before_update()` waits for the copy before the optimizer step. Its blocking time is what the
loop loses: the call, that wait, and how much slower the forward and backward ran than the same pass alone in the
same round.

    python bench/checkpoint.py [--rounds 5] [--dim 768] [--layers 4] [--dir /path/on/the/disk/to/test]

Torch runs on one thread by default: on this shared 2-core machine a two-thread copy stalls behind the other
processes (each copy waits for its slowest thread), which makes the staging copy of an async save erratic, from
0.1 s to 1.5 s for the same 600 MB; `--threads 2` shows it. A GPU trainer's staging copy is a device-to-host copy,
which intra-op threads do not affect.

Prints save throughput / disk write bandwidth against both baselines (target >= 0.7 of the flush-behind write; the
save also checksums every byte with XXH3-128 and writes the manifest), the blocking time of an asynchronous save
over the time of a synchronous one (target <= 0.2) and the resume time over the time to read the checkpoint once
(target <= 1.3); ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from aiinfra.checkpoint.commit import FLUSH_BEHIND_BYTES, start_writeback
from aiinfra.checkpoint.manager import CheckpointManager, CheckpointPolicy, TrainingState, checkpoint_name
from aiinfra.models import Transformer
from aiinfra.spec import ModelSpec

BLOCK_BYTES = 8 << 20


def sequential_write_s(path: Path, total_bytes: int, flush_behind: bool) -> float:
    """Seconds to write `total_bytes` sequentially in 8 MiB blocks and fsync them (what `dd conv=fsync` does);
    with `flush_behind`, also asking the kernel to start writeback every 32 MiB, as the checkpoint writer does."""
    block = memoryview(os.urandom(BLOCK_BYTES))
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        remaining, written_back = total_bytes, 0
        while remaining > 0:
            remaining -= handle.write(block[: min(remaining, BLOCK_BYTES)])
            written = total_bytes - remaining
            if flush_behind and start_writeback is not None and written - written_back >= FLUSH_BEHIND_BYTES:
                start_writeback(handle.fileno(), written_back, written - written_back)
                written_back = written
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def drop_cached_pages(directory: Path) -> None:
    """Evict the files under `directory` from the page cache (they are fsynced, so their pages are clean)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_read_s(directory: Path) -> float:
    """Seconds to read every file under `directory` once, sequentially in 8 MiB blocks, from a cold page cache."""
    drop_cached_pages(directory)
    buffer = bytearray(BLOCK_BYTES)
    started = time.perf_counter()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
    return time.perf_counter() - started


def cold_resume_s(checkpoint_dir: Path, state: TrainingState) -> float:
    """Seconds for a fresh manager to resume `state` from the latest checkpoint, from a cold page cache."""
    drop_cached_pages(checkpoint_dir)
    started = time.perf_counter()
    CheckpointManager(checkpoint_dir).load_latest(state)
    return time.perf_counter() - started


def plain_dcp_save_s(path: Path, state: TrainingState) -> float:
    """Seconds for DCP's own FileSystemWriter (same two threads, fsync) to save the same state: what hashing and
    the manifest add on top of DCP."""
    model_sd, optim_sd = get_state_dict(state.model, [state.optimizer])
    started = time.perf_counter()
    dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=dcp.FileSystemWriter(path, thread_count=2),
             no_dist=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(path)
    return elapsed


def forward_backward_s(state: TrainingState, tokens: int) -> float:
    """Seconds of one forward and backward pass over `tokens` tokens: the part of a training step that reads the
    weights without changing them, which an overlapped staging copy runs beside."""
    started = time.perf_counter()
    state.model(torch.zeros(1, tokens, dtype=torch.long)).float().mean().backward()
    elapsed = time.perf_counter() - started
    state.optimizer.zero_grad(set_to_none=True)
    return elapsed


def build_state(dim: int, layers: int) -> TrainingState:
    """The model with AdamW state allocated (one step on a tiny batch), as a trainer would checkpoint it."""
    spec = ModelSpec(
        vocab_size=8192, dim=dim, n_layers=layers, n_heads=max(1, dim // 64), n_kv_heads=max(1, dim // 64),
        ffn_dim=4 * dim, max_seq_len=64,
    )
    model = Transformer(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 8, dtype=torch.long)).float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    return TrainingState(model, optimizer, scheduler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="a directory on the disk to measure (default: a temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the note above)")
    parser.add_argument("--step-tokens", type=int, default=64, help="tokens of the forward and backward pass that "
                        "an async save's staging copy overlaps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    state = build_state(args.dim, args.layers)
    resumed = build_state(args.dim, args.layers)
    parameters = sum(p.numel() for p in state.model.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        root = Path(root)
        manager = CheckpointManager(root / "ckpt", CheckpointPolicy(keep_last=1, overlap_staging=True))
        dd_s, raw_s, sync_s, plain_dcp_s, blocking_s, async_total_s = [], [], [], [], [], []
        returned_s, alone_s = [], []
        read_s, resume_s = [], []
        step = 0
        for _ in range(args.rounds):
            step += 1
            started = time.perf_counter()
            manager.save(step, state, block=True)
            sync_s.append(time.perf_counter() - started)
            manager.wait()  # the previous checkpoint's deletion runs in the background: keep it out of the baseline
            checkpoint_bytes = manager.metrics.last_bytes
            dd_s.append(sequential_write_s(root / "dd.bin", checkpoint_bytes, flush_behind=False))
            raw_s.append(sequential_write_s(root / "raw.bin", checkpoint_bytes, flush_behind=True))
            plain_dcp_s.append(plain_dcp_save_s(root / "plain", state))
            step += 1
            alone_s.append(forward_backward_s(state, args.step_tokens))
            started = time.perf_counter()
            manager.save(step, state, block=False)
            returned_s.append(time.perf_counter() - started)
            with_save_s = forward_backward_s(state, args.step_tokens)
            waited = time.perf_counter()
            manager.before_update()
            # What the training loop lost: the call, the wait before the optimizer step, and how much slower the
            # step's forward and backward ran beside the staging copy than alone (never counted below 0).
            blocking_s.append(returned_s[-1] + (time.perf_counter() - waited) + max(0.0, with_save_s - alone_s[-1]))
            manager.wait()
            async_total_s.append(time.perf_counter() - started)
            read_s.append(cold_read_s(root / "ckpt" / checkpoint_name(step)))
            resume_s.append(cold_resume_s(root / "ckpt", resumed))
        manager.close()

    def ratio_to(baseline_s: list[float], measured_s: list[float]) -> float:
        return statistics.median(baseline_s) / statistics.median(measured_s)

    dd, raw, sync = (statistics.median(times) for times in (dd_s, raw_s, sync_s))
    blocking_ratio = statistics.median(blocking_s) / sync
    read, resume = statistics.median(read_s), statistics.median(resume_s)
    print(f"workload: {parameters / 1e6:.1f}M parameters + AdamW, {checkpoint_bytes / 1e6:.0f} MB per checkpoint, "
          f"{args.rounds} rounds, medians, {args.threads} torch thread(s)")
    print(f"disk, dd-style write + fsync       : {checkpoint_bytes / dd / 1e6:8.1f} MB/s  ({dd:.2f} s)")
    print(f"disk, the same with flush-behind   : {checkpoint_bytes / raw / 1e6:8.1f} MB/s  ({raw:.2f} s)")
    print(f"synchronous checkpoint save        : {checkpoint_bytes / sync / 1e6:8.1f} MB/s  ({sync:.2f} s)")
    print(f"  save throughput / dd-style write       = {ratio_to(dd_s, sync_s):.2f}  (target >= 0.7)")
    print(f"  save throughput / flush-behind write   = {ratio_to(raw_s, sync_s):.2f}  (the stricter baseline)")
    print(f"  DCP alone (no checksum, no manifest)   = {ratio_to(dd_s, plain_dcp_s):.2f} / "
          f"{ratio_to(raw_s, plain_dcp_s):.2f}")
    print(f"asynchronous save: save() returns after {statistics.median(returned_s):.3f} s; with the staging copy "
          f"beside a {statistics.median(alone_s):.2f} s forward and backward, the loop loses "
          f"{statistics.median(blocking_s):.3f} s; committed after {statistics.median(async_total_s):.2f} s")
    print(f"  async blocking time / sync save time   = {blocking_ratio:.3f}  (target <= 0.2)")
    print(f"cold read of the checkpoint once       : {checkpoint_bytes / read / 1e6:8.1f} MB/s  ({read:.2f} s)")
    print(f"cold resume (load_latest, verified)    : {checkpoint_bytes / resume / 1e6:8.1f} MB/s  ({resume:.2f} s)")
    print(f"  resume time / single read time         = {resume / read:.2f}  (target <= 1.3)")
    print(json.dumps({
        "checkpoint_bytes": checkpoint_bytes,
        "parameters": parameters,
        "disk_dd_write_mb_per_s": round(checkpoint_bytes / dd / 1e6, 1),
        "disk_flush_behind_write_mb_per_s": round(checkpoint_bytes / raw / 1e6, 1),
        "sync_save_mb_per_s": round(checkpoint_bytes / sync / 1e6, 1),
        "save_throughput_over_dd_write": round(ratio_to(dd_s, sync_s), 3),
        "save_throughput_over_flush_behind_write": round(ratio_to(raw_s, sync_s), 3),
        "plain_dcp_over_dd_write": round(ratio_to(dd_s, plain_dcp_s), 3),
        "plain_dcp_over_flush_behind_write": round(ratio_to(raw_s, plain_dcp_s), 3),
        "sync_save_s": round(sync, 3),
        "async_blocking_s": round(statistics.median(blocking_s), 3),
        "async_save_call_s": round(statistics.median(returned_s), 3),
        "forward_backward_s": round(statistics.median(alone_s), 3),
        "async_blocking_over_sync_save": round(blocking_ratio, 3),
        "cold_read_s": round(read, 3),
        "resume_s": round(resume, 3),
        "resume_over_single_read": round(resume / read, 3),
        "rounds": args.rounds,
        "torch_threads": args.threads,
    }))


if __name__ == "__main__":
    main()
