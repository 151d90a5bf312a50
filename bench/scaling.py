"""Tokens/s and communication fraction of each parallel layout on this machine, against one process.

Workload: preset tiny (4 layers, dim 256) untied, seq 128, global batch 16 sequences, bf16 autocast, the stdlib
corpus, `--steps` steps per layout. Baseline: one process with every core, same global batch, run first and again
last (the machine is shared: the two baseline runs bound the drift). Each layout runs through `launch_train` (the
function behind `aiinfra train --nproc N`) with the cores split among its processes. Tokens/s is the median over
steps after the first; the communication fraction is measured by the profiler on every 4th step (time inside
collectives / step time, averaged over ranks).

    python bench/scaling.py [--nproc 2] [--steps 12] [--layouts ddp,fsdp,tp,pp_1f1b]

Prints a table of tokens/s, the ratio to the baseline and the communication fraction; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from aiinfra.distributed.launch import launch_train

WORKLOAD = [
    "model.preset=tiny",
    "model.tie_embeddings=false",
    "train.seq_len=128",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.dtype=bf16",
    "train.device=cpu",
    "run.progress=false",
    "run.sample_tokens=0",
    "parallel.measure_comm_every=4",
]
GLOBAL_BATCH = 16


def layouts(nproc: int) -> dict[str, list[str]]:
    """Layout name -> overrides, for `nproc` processes and a global batch of GLOBAL_BATCH sequences."""
    local = f"train.micro_batch={GLOBAL_BATCH // nproc}"
    return {
        "ddp": [f"parallel.dp_replicate={nproc}", local],
        "fsdp": [f"parallel.dp_shard={nproc}", local],
        "fsdp_no_reshard": [f"parallel.dp_shard={nproc}", "parallel.reshard_after_forward=false", local],
        "tp": [f"parallel.tp={nproc}", f"train.micro_batch={GLOBAL_BATCH}"],
        "pp_gpipe": [f"parallel.pp={nproc}", "parallel.pp_schedule=gpipe", f"train.micro_batch={GLOBAL_BATCH}"],
        "pp_1f1b": [f"parallel.pp={nproc}", "parallel.pp_schedule=1f1b", f"train.micro_batch={GLOBAL_BATCH}"],
    }


def run(name: str, overrides: list[str], nproc: int, steps: int, workdir: Path) -> dict[str, float]:
    run_dir = workdir / name
    status = launch_train(None, [*WORKLOAD, f"train.steps={steps}", *overrides, f"run.dir={run_dir}"], nproc)
    if status:
        raise SystemExit(f"layout {name} failed with exit status {status}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records[1:] if "rank_comm_s" not in r]  # profiled steps are slower: left out
    fractions = [r["comm_fraction"] for r in records if "comm_fraction" in r]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "comm_fraction": statistics.mean(fractions) if fractions else 0.0,
        "peak_memory_mb_rank0": max(r.get("rank_peak_memory_bytes", [0])[0] for r in records) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--layouts", default="ddp,fsdp,tp,pp_1f1b", help="of ddp,fsdp,fsdp_no_reshard,tp,pp_gpipe,pp_1f1b"
    )
    args = parser.parse_args()
    chosen = {name: overrides for name, overrides in layouts(args.nproc).items() if name in args.layouts.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        single = [f"train.micro_batch={GLOBAL_BATCH}"]
        first = run("single_first", single, 1, args.steps, workdir)
        # One process on one thread: separates "more processes" from "fewer threads per process".
        chosen = {"single_1_thread": [*single, "train.threads=1"], **chosen}
        results = {
            name: run(name, overrides, 1 if name.startswith("single") else args.nproc, args.steps, workdir)
            for name, overrides in chosen.items()
        }
        last = run("single_last", single, 1, args.steps, workdir)
    baseline = (first["tokens_per_s"] + last["tokens_per_s"]) / 2
    print(f"\nworkload: preset tiny untied, {GLOBAL_BATCH} x 128 tokens/step, bf16, {args.nproc} processes vs 1")
    print(
        f"baseline (1 process, all cores): {baseline:,.0f} tokens/s "
        f"(first {first['tokens_per_s']:,.0f}, last {last['tokens_per_s']:,.0f})"
    )
    print(f"{'layout':>16} {'tokens/s':>10} {'vs 1 proc':>10} {'comm fraction':>14} {'peak MB r0':>11}")
    for name, r in results.items():
        print(
            f"{name:>16} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / baseline:>10.2f} "
            f"{r['comm_fraction']:>14.2f} {r['peak_memory_mb_rank0']:>11.0f}"
        )
    fastest = max(results, key=lambda name: results[name]["tokens_per_s"])
    figures = {
        "nproc": args.nproc,
        "single_process_tokens_per_s": round(baseline),
        **{f"{name}_vs_single_process": round(r["tokens_per_s"] / baseline, 3) for name, r in results.items()},
        **{f"{name}_comm_fraction": round(r["comm_fraction"], 3) for name, r in results.items()},
        "fastest_layout": fastest if results[fastest]["tokens_per_s"] > baseline else "single_process",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
