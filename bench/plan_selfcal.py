"""Self-calibration: the planner predicts the step time of aiinfra's own trainer on this machine, then we measure it.

1. Profile the machine (no planner input is guessed): the fp32 matmul peak (2048^3, all cores), the bandwidth of a
   large tensor copy, and gloo's all-reduce bus bandwidth and small-message latency between 2 local processes
   (`aiinfra.distributed.comm_bench`, nccl-tests' definitions).
2. Predict with `aiinfra.plan.calibration.predict_trainer_step` for: one process (all cores), DDP on 2 processes,
   FSDP on 2 processes (one core each).
3. Measure: run `aiinfra train` (fp32, the embedded tiny model, the same global batch) in each layout and take the
   median step time after warm-up from its metrics.jsonl.

    python bench/plan_selfcal.py [--steps 12]

Prints predicted against measured with the error per layout; ends with one line of JSON. This machine is shared
and noisy: the layouts run one after another, so rerun to see the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aiinfra.config import load_config
from aiinfra.observe.device_peak import measure_matmul_flops
from aiinfra.observe.step_log import read_metrics
from aiinfra.plan.calibration import CpuProfile, predict_trainer_step

# train.micro_batch is per data-parallel rank: 2 ranks x 8 keep the global batch of one process x 16.
LAYOUTS = {
    "single": (1, ["train.micro_batch=16"]),
    "ddp2": (2, ["parallel.dp_replicate=2", "train.micro_batch=8"]),
    "fsdp2": (2, ["parallel.dp_shard=2", "train.micro_batch=8"]),
}


def copy_bandwidth_bytes_per_s(size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best rate of copying one large fp32 tensor into another (read + write bytes counted)."""
    source = torch.ones(size_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * size_bytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gloo_allreduce(workdir: Path) -> tuple[float, float]:
    """(bus bandwidth bytes/s at 64 MiB, latency s at 1 KiB) of a 2-process gloo all-reduce."""
    out = workdir / "comm.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "aiinfra.distributed.comm_bench",
        "--op=all_reduce",
        "--min-bytes=1024",
        f"--max-bytes={64 * 2**20}",
        "--step-factor=64",
        f"--json={out}",
    ]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    largest, smallest = max(rows, key=lambda r: r["size_bytes"]), min(rows, key=lambda r: r["size_bytes"])
    # A ring all-reduce on n=2 ranks takes 2(n-1) = 2 latency-bound steps.
    return largest["busbw_gbps"] * 1e9, smallest["time_us"] * 1e-6 / 2


def measure_trainer(name: str, overrides: list[str], steps: int, workdir: Path) -> float:
    """Median step time (s) of `aiinfra train` in one layout, after two warm-up steps."""
    nproc, layout = LAYOUTS[name]
    run_dir = workdir / name
    args = [*overrides, *layout, f"run.dir={run_dir}"]
    command = [sys.executable, "-m", "aiinfra", "train", "--nproc", str(nproc)]
    command += [a for item in args for a in ("--set", item)]
    subprocess.run(command, check=True, capture_output=True)
    times = [r["step_time_s"] for r in read_metrics(run_dir) if "step_time_s" in r][2:]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    overrides = [
        "train.dtype=fp32",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "run.sample_tokens=0",
        "run.progress=false",
        "train.device=cpu",
    ]
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bus_bw, latency = gloo_allreduce(workdir)
        profile = CpuProfile(
            matmul_flops_per_s=measure_matmul_flops(torch.float32, torch.device("cpu")),
            memory_bw_bytes_per_s=copy_bandwidth_bytes_per_s(),
            allreduce_bus_bw_bytes_per_s=bus_bw,
            allreduce_latency_s=latency,
            memory_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            cores=os.cpu_count() or 1,
        )
        print(
            f"profile: matmul {profile.matmul_flops_per_s / 1e9:.1f} GFLOP/s, "
            f"copy {profile.memory_bw_bytes_per_s / 1e9:.1f} GB/s, "
            f"gloo all-reduce busbw {bus_bw / 1e9:.2f} GB/s, latency {latency * 1e6:.0f} us"
        )
        spec, seq_len = config.model, config.train.seq_len
        global_batch = config.train.micro_batch * config.train.grad_accum
        rows = []
        for name, (nproc, _) in LAYOUTS.items():
            sharding = "fsdp" if name.startswith("fsdp") else "ddp"
            predicted = predict_trainer_step(spec, profile, seq_len, global_batch, nproc, sharding).step_time_s
            measured = measure_trainer(name, overrides, args.steps, workdir)
            rows.append((name, predicted, measured, predicted / measured - 1))
    print(f"workload: preset tiny, fp32, {global_batch} x {seq_len} tokens per step, {os.cpu_count()} cores")
    print(f"{'layout':>8} {'predicted s':>12} {'measured s':>11} {'error':>8}")
    for name, predicted, measured, error in rows:
        print(f"{name:>8} {predicted:>12.3f} {measured:>11.3f} {100 * error:>+7.1f}%")
    figures = {f"selfcal_error_{name}": round(error, 4) for name, _, _, error in rows}
    figures["selfcal_max_abs_error"] = round(max(abs(r[3]) for r in rows), 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
