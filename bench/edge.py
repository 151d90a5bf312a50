"""The edge profile against the cloud profile on the same model, and the ONNX engine's KV cache against recompute.

Workload: a run directory (`--run`; default: the `tiny` preset, 4.2M parameters, with random weights and the
embedded corpus's 4096-token tokenizer, saved once into a temporary folder: speed and memory do not depend on what
the weights learned).

Serving: `aiinfra serve RUN` (cloud: today's defaults, an engine process beside the HTTP server, fp32, all threads,
oneDNN-packed weights, a 256 MiB KV cache) and `aiinfra serve RUN --profile edge --memory-mb M` (int8 weights, one
thread, one process), each started in a process of its own, one after the other. Start-up: from the command's start
to the first 200 of /v1/models. The cloud profile is also measured with --threads 1 (the
stronger baseline on a shared machine, where a team of OpenMP threads stalls whenever a core is taken). Throughput:
the load generator of `aiinfra bench serve` (--num-prompts streamed
completions, --concurrency in flight, greedy, ignore_eos), output tokens per second. Peak RSS: the sum over the
server's process tree of each process's VmHWM (/proc), read after the load, before the server is stopped.

ONNX: the run exported by `aiinfra export --format onnx` (fp32) and run by serve/onnx_engine.py on one thread: ms
per generated token with the KV cache (one step per token) against a recompute of the whole sequence per token
(the same graph, fed the full sequence with an empty cache), greedy from a --prompt-len prompt for --onnx-tokens
tokens; and the largest logit difference against torch in fp32 over a prefill and every decode step.

    python bench/edge.py [--run RUN] [--memory-mb 768] [--num-prompts 32] [--concurrency 8]

Ends with one line of JSON (edge_peak_rss_mb, cloud_peak_rss_mb, edge_startup_s, cloud_startup_s,
edge_tokens_per_s, cloud_tokens_per_s, onnx_kv_ms_per_token, onnx_nokv_ms_per_token, onnx_max_abs_logit_diff, ...).
This machine is shared: rerun on a quiet one before quoting absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from servers import free_port

MIB = 2**20


def make_default_run(folder: Path) -> Path:
    """The `tiny` preset with random weights and the stdlib corpus's tokenizer, as a finished run."""
    from aiinfra.checkpoint.run_dir import save_run
    from aiinfra.config import load_config
    from aiinfra.data.dataset import default_cache_dir, prepare_dataset
    from aiinfra.models import Transformer

    config = load_config(None, [])
    dataset = prepare_dataset(
        config.data.corpus, config.model.vocab_size, config.data.val_fraction, default_cache_dir()
    )
    torch.manual_seed(0)
    run_dir = folder / "tiny-random"
    run_dir.mkdir(parents=True)
    save_run(run_dir, Transformer(config.model).eval(), config, dataset.tokenizer, {})
    return run_dir


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc/<pid>/task/*/children)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return tree


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of each process's peak resident set (VmHWM)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        total += int(line.split()[1]) * 1024
    return total


def measure_server(run_dir: Path, extra: list[str], num_prompts: int, concurrency: int) -> dict:
    """Start `aiinfra serve` with `extra`, time its start-up, load it, read its process tree's peak RSS."""
    from aiinfra.serve.loadgen import LoadSpec, run_load

    port = free_port()
    command = [sys.executable, "-m", "aiinfra", "serve", str(run_dir), "--port", str(port), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited:\n{process.stdout.read()}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        startup_s = time.perf_counter() - started
        spec = LoadSpec(
            base_url=base, num_prompts=num_prompts, max_concurrency=concurrency, input_len=32, output_len=64, seed=0
        )
        asyncio.run(run_load(LoadSpec(**{**spec.__dict__, "num_prompts": concurrency})))  # warm-up
        report = asyncio.run(run_load(spec))
        pids = process_tree(process.pid)
        peak = peak_rss_bytes(pids)
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    if report["failed"]:
        raise RuntimeError(f"{report['failed']} requests failed: {report.get('errors')}")
    return {
        "startup_s": startup_s,
        "tokens_per_s": report["output_tokens_per_s"],
        "peak_rss_bytes": peak,
        "processes": len(pids),
        "log": output.strip().splitlines()[:2],
    }


def measure_onnx(run_dir: Path, folder: Path, prompt_len: int, new_tokens: int) -> dict:
    """The ONNX engine: logits against torch (fp32), ms per token with and without the KV cache."""
    from aiinfra.checkpoint.export import export_onnx
    from aiinfra.checkpoint.run_dir import load_run
    from aiinfra.serve.onnx_engine import OnnxEngine

    torch_model = load_run(run_dir).model
    engine = OnnxEngine(export_onnx(run_dir, folder / "onnx"), threads=1)
    vocab = torch_model.spec.vocab_size
    tokens = torch.randint(0, vocab, (1, prompt_len + new_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = torch_model(tokens).numpy()
    logits, past = engine.forward(tokens[:, :prompt_len].numpy())
    diffs = [float(np.abs(logits - reference[:, :prompt_len]).max())]
    for position in range(prompt_len, prompt_len + new_tokens):
        logits, past = engine.forward(tokens[:, position : position + 1].numpy(), past)
        diffs.append(float(np.abs(logits[:, 0] - reference[:, position]).max()))
    prompt = tokens[0, :prompt_len].tolist()
    timings = {}
    for use_cache in (True, False, True, False):  # alternated, best of two each
        started = time.perf_counter()
        generated = engine.generate_ids(prompt, new_tokens, use_cache=use_cache, stop_at_eos=False)
        elapsed_ms = 1000 * (time.perf_counter() - started) / len(generated)
        timings[use_cache] = min(timings.get(use_cache, float("inf")), elapsed_ms)
    same = engine.generate_ids(prompt, 16, True, False) == engine.generate_ids(prompt, 16, False, False)
    return {
        "kv_ms": timings[True],
        "nokv_ms": timings[False],
        "max_diff": max(diffs),
        "same_tokens": same,
        "bytes": (folder / "onnx" / "model.onnx").stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="run directory (default: tiny, random weights)")
    parser.add_argument("--memory-mb", type=float, default=768, help="the edge profile's budget")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per server")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--prompt-len", type=int, default=32, help="ONNX: prompt tokens")
    parser.add_argument("--onnx-tokens", type=int, default=128, help="ONNX: generated tokens per measurement")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    folder = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    run_dir = args.run or make_default_run(folder)

    cloud = measure_server(run_dir, [], args.num_prompts, args.concurrency)
    # The cloud profile with one engine thread as well: on a shared machine an OpenMP team stalls whenever a core
    # is taken, so this is the stronger baseline for throughput there.
    cloud_1 = measure_server(run_dir, ["--threads", "1"], args.num_prompts, args.concurrency)
    edge = measure_server(
        run_dir, ["--profile", "edge", "--memory-mb", f"{args.memory_mb:g}"], args.num_prompts, args.concurrency
    )
    print(f"{'profile':<18}{'peak RSS MiB':>14}{'processes':>11}{'start-up s':>12}{'tokens/s':>10}")
    for name, row in (("cloud", cloud), ("cloud --threads 1", cloud_1), ("edge", edge)):
        print(
            f"{name:<18}{row['peak_rss_bytes'] / MIB:>14.0f}{row['processes']:>11}{row['startup_s']:>12.2f}"
            f"{row['tokens_per_s']:>10.0f}"
        )
    print(f"edge: {edge['log'][0]}")
    within = edge["peak_rss_bytes"] <= args.memory_mb * MIB
    ratio = {key: edge[key] / cloud[key] for key in ("peak_rss_bytes", "startup_s", "tokens_per_s")}
    print(
        f"edge peak RSS {edge['peak_rss_bytes'] / MIB:.0f} MiB {'within' if within else 'OVER'} its "
        f"{args.memory_mb:g} MiB budget; edge / cloud: RSS {ratio['peak_rss_bytes']:.2f}x, start-up "
        f"{ratio['startup_s']:.2f}x, tokens/s {ratio['tokens_per_s']:.2f}x "
        f"({edge['tokens_per_s'] / cloud_1['tokens_per_s']:.2f}x the one-thread cloud server)"
    )

    torch.set_num_threads(1)
    onnx = measure_onnx(run_dir, folder, args.prompt_len, args.onnx_tokens)
    print(
        f"ONNX Runtime, 1 thread, {args.prompt_len}-token prompt, {args.onnx_tokens} tokens: "
        f"{onnx['kv_ms']:.2f} ms/token with the KV cache, {onnx['nokv_ms']:.2f} ms/token recomputing "
        f"({onnx['nokv_ms'] / onnx['kv_ms']:.1f}x); max |logit - torch| {onnx['max_diff']:.2e} "
        f"({'within' if onnx['max_diff'] <= 1e-4 else 'OVER'} 1e-4); greedy tokens same with and without cache: "
        f"{onnx['same_tokens']}"
    )
    print(
        json.dumps(
            {
                "edge_peak_rss_mb": edge["peak_rss_bytes"] / MIB,
                "cloud_peak_rss_mb": cloud["peak_rss_bytes"] / MIB,
                "edge_memory_budget_mb": args.memory_mb,
                "edge_within_budget": within,
                "edge_startup_s": edge["startup_s"],
                "cloud_startup_s": cloud["startup_s"],
                "edge_tokens_per_s": edge["tokens_per_s"],
                "cloud_tokens_per_s": cloud["tokens_per_s"],
                "cloud_1thread_tokens_per_s": cloud_1["tokens_per_s"],
                "cloud_1thread_peak_rss_mb": cloud_1["peak_rss_bytes"] / MIB,
                "onnx_kv_ms_per_token": onnx["kv_ms"],
                "onnx_nokv_ms_per_token": onnx["nokv_ms"],
                "onnx_kv_speedup": onnx["nokv_ms"] / onnx["kv_ms"],
                "onnx_max_abs_logit_diff": onnx["max_diff"],
                "onnx_same_greedy_tokens": onnx["same_tokens"],
            }
        )
    )


if __name__ == "__main__":
    main()
