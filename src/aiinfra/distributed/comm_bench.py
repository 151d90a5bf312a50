"""Collective benchmark with nccl-tests' definitions, on any backend (gloo on CPU, NCCL on CUDA).

Run by `aiinfra bench comm` under torchrun. For each op and message size S (bytes, as nccl-tests counts it:
the all-reduce buffer, the all-gather output, the reduce-scatter input, the all-to-all buffer) and n ranks:

    algbw = S / t
    busbw = algbw * 2(n-1)/n  for all_reduce
    busbw = algbw * (n-1)/n   for all_gather, reduce_scatter, all_to_all

t is the mean time of one call, the slowest rank's (see nccl-tests/doc/PERFORMANCE.md). busbw is comparable
to the link's peak bandwidth whatever n is.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def bus_factor(op: str, world_size: int) -> float:
    """busbw / algbw for `op` on `world_size` ranks (nccl-tests)."""
    n = world_size
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def message_sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """min_bytes, min_bytes * factor, ... up to max_bytes."""
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def _collective(op: str, size_bytes: int, world_size: int, device: torch.device):
    """A zero-argument callable running one `op` on a buffer of `size_bytes` (nccl-tests' S)."""
    count = max(world_size, size_bytes // 4 // world_size * world_size)  # float32, divisible by the world size
    full = torch.ones(count, device=device)
    part = torch.ones(count // world_size, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, part)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, full)
    out = torch.empty_like(full)
    return lambda: dist.all_to_all_single(out, full)


def time_op(op: str, size_bytes: int, device: torch.device, budget_s: float = 0.25, max_iters: int = 50) -> float:
    """Mean seconds per call, slowest rank: a warm-up call, then as many calls as fit in `budget_s`."""
    world_size = dist.get_world_size()
    run = _collective(op, size_bytes, world_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    # Every rank must make the same number of calls: rank 0 decides from one timed call.
    dist.barrier()
    start = time.perf_counter()
    run()
    sync()
    iters = torch.tensor([min(max_iters, max(2, int(budget_s / max(time.perf_counter() - start, 1e-6))))])
    dist.broadcast(iters, src=0)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(int(iters)):
        run()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / int(iters)], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS, help="repeatable (default: all four)")
    parser.add_argument("--min-bytes", type=int, default=1024)
    parser.add_argument("--max-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--step-factor", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    # torch 2.13 renames *_into_tensor/*_tensor to *_single; the old names are what torch < 2.13 has.
    warnings.filterwarnings("ignore", category=FutureWarning)
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    world_size, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    if rank == 0:
        print(f"# {world_size} ranks, backend {backend}, float32; busbw per nccl-tests")
        print(f"{'op':>15} {'size(B)':>11} {'count':>10} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}")
    for op in args.op or OPS:
        for size in message_sizes(args.min_bytes, args.max_bytes, args.step_factor):
            seconds = time_op(op, size, device)
            algbw = size / seconds / 1e9
            row = {
                "op": op,
                "size_bytes": size,
                "count": size // 4,
                "time_us": seconds * 1e6,
                "algbw_gbps": algbw,
                "busbw_gbps": algbw * bus_factor(op, world_size),
            }
            rows.append(row)
            if rank == 0:
                print(
                    f"{op:>15} {size:>11} {size // 4:>10} {row['time_us']:>11.1f} {algbw:>12.3f} "
                    f"{row['busbw_gbps']:>12.3f}",
                    flush=True,
                )
    if rank == 0:
        largest = {op: max((r for r in rows if r["op"] == op), key=lambda r: r["size_bytes"]) for op in args.op or OPS}
        smallest = {op: min((r for r in rows if r["op"] == op), key=lambda r: r["size_bytes"]) for op in args.op or OPS}
        headline = {
            "world_size": world_size,
            "backend": backend,
            **{f"{op}_busbw_gbps_at_{r['size_bytes']}_bytes": round(r["busbw_gbps"], 4) for op, r in largest.items()},
            **{f"{op}_latency_us_at_{r['size_bytes']}_bytes": round(r["time_us"], 1) for op, r in smallest.items()},
        }
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"headline": headline, "rows": rows}, handle, indent=1)
        print(json.dumps(headline))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
