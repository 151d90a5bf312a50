"""aiinfra's server against its peers, through the same load generator, on the same Llama-format folder.

Workload: Llama-format models made here with random weights (seed 0; a byte-level BPE tokenizer of 8192 entries
trained on this interpreter's standard library): `tiny` (hidden 256, 4 layers, 4 heads, 8.5M parameters, where
per-step overhead dominates) and `125m` (hidden 768, 12 layers, 12 heads, MLP 3072, 126M parameters, where the
matmuls do), in fp32 and bf16 (--dtype on every server), prompts of about --input-len random words, --output-len
tokens each (ignore_eos), greedy, at fixed concurrency 1, 8 and 32.
Peers: (a) Hugging Face transformers, batched `generate` (bench/serve_hf_peer.py: every waiting request in one
left-padded batch); (b) vLLM's CPU build, if a Python with it is given (--vllm-python), started as vLLM's OpenAI
server. Every server runs on the same number of torch threads (--threads); the two whose model runs in a process of
its own (ours and vLLM) have it pinned to the same CPUs.

    python bench/serve_peers.py [--models tiny 125m] [--dtypes fp32 bf16] [--vllm-python /tmp/vllm-venv/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aiinfra.serve.loadgen import LoadSpec, run_load
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent


MODELS = {  # name: (hidden, layers, heads, MLP)
    "tiny": (256, 4, 4, 688),
    "125m": (768, 12, 12, 3072),
}


def build_model_dir(folder: Path, size: str) -> Path:
    """A shared random-weight Llama folder (built once; the same seed gives the same weights)."""
    if (folder / "config.json").is_file():
        return folder
    hidden, layers, heads, ffn = MODELS[size]
    import sysconfig

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aiinfra.data.tokenizer import END_OF_TEXT, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))[:150]]
    tokenizer = train_tokenizer(texts, 8192)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=2048, rope_theta=10000.0, eos_token_id=eos,
        bos_token_id=eos, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_TEXT, "bos_token": END_OF_TEXT,
        "model_max_length": 2048,
    }))
    return folder


def start(command: list[str], port: int, env: dict[str, str], startup_s: float, log: Path) -> subprocess.Popen:
    """Start a server and wait (bounded) until /v1/models answers."""
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{command[:4]} did not start within {startup_s} s; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(port: int, model: str, concurrency: int, args: argparse.Namespace) -> dict:
    # Warm up (first-call allocations, lazy imports) outside the measurement.
    warm = LoadSpec(base_url=f"http://127.0.0.1:{port}", model=model, num_prompts=2, max_concurrency=2,
                    input_len=args.input_len, output_len=8, seed=99)
    asyncio.run(run_load(warm))
    spec = LoadSpec(base_url=f"http://127.0.0.1:{port}", model=model, max_concurrency=concurrency,
                    num_prompts=max(args.min_prompts, args.prompts_per_slot * concurrency),
                    input_len=args.input_len, output_len=args.output_len, seed=0)
    return asyncio.run(run_load(spec))


def peer_commands(folder: Path, dtype: str, args: argparse.Namespace) -> dict[str, tuple[list[str], dict, float]]:
    """How to start each peer on `folder` in `dtype`: (command, environment, startup limit in s)."""
    threads = str(args.threads)
    thread_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # Both engines that run in a process of their own are pinned to the same CPUs (the first --threads ones unless
    # --engine-cpus says otherwise), their HTTP servers left to the others: vLLM through VLLM_CPU_OMP_THREADS_BIND,
    # ours through --engine-cpus.
    cpu_list = args.engine_cpus or ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))
    peers: dict[str, tuple[list[str], dict[str, str], float]] = {
        "aiinfra": ([sys.executable, "-m", "aiinfra.serve", str(folder), "--threads", threads, "--engine-cpus",
                     cpu_list, "--kv-cache-memory-mb", "512", "--served-model-name", folder.name, "--dtype", dtype],
                    thread_env, 300),
        "hf_batched": ([sys.executable, str(ROOT / "bench" / "serve_hf_peer.py"), str(folder), "--threads",
                        threads, "--dtype", dtype], thread_env, 300),
    }
    if args.vllm_python is not None:
        peers["vllm_cpu"] = (
            [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", folder.name, "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype],
             "--max-model-len", "2048", "--max-num-seqs", "64", "--disable-log-stats"],
            {**thread_env, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_OMP_THREADS_BIND": cpu_list},
            600,
        )
    return {name: peer for name, peer in peers.items() if name in args.peers}


def measure_all(folder: Path, dtype: str, args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """Every peer at every concurrency on one model and dtype: the median round of each."""
    # All servers stay up together (idle ones cost little) and are measured in turn, round after round, so that
    # drift in this shared machine's load hits every peer alike; each figure is the median round.
    processes: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for name, (command, env, startup_s) in peer_commands(folder, dtype, args).items():
            port = free_port()
            try:
                processes[name] = (start(command + ["--port", str(port)], port, env, startup_s,
                                         args.log_dir / f"{folder.name}-{dtype}-{name}.log"), port)
            except RuntimeError as error:
                print(f"{name}: not measured ({error})", flush=True)
        rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in processes}
        for concurrency in args.concurrency:
            for round_index in range(args.rounds):
                for name, (_, port) in processes.items():
                    report = measure(port, folder.name, concurrency, args)
                    rounds[name][concurrency].append(report)
                    print(f"{folder.name} {dtype} round {round_index} {name:>12} c={concurrency:<3} "
                          f"{report['completed']:>3} ok {report['failed']} failed "
                          f"{report['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {report['p50_ttft_ms']:7.1f} ms  "
                          f"TPOT p50 {report['p50_tpot_ms']:6.2f} ms", flush=True)
    finally:
        for process, _ in processes.values():
            stop(process)
    return {name: {c: sorted(reports, key=lambda r: r["output_tokens_per_s"])[len(reports) // 2]
                   for c, reports in by_concurrency.items()}
            for name, by_concurrency in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "125m"])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--model-root", type=Path, default=Path("/tmp"), help="where the model folders are built")
    parser.add_argument("--vllm-python", type=Path, default=None, help="a Python that has vllm-cpu installed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every server")
    parser.add_argument("--engine-cpus", default="", help="CPUs of both engine processes (default: the first "
                        "--threads CPUs, where vLLM's CPU build binds by default)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=64, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts-per-slot", type=int, default=3)
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per peer and concurrency (median)")
    parser.add_argument("--peers", nargs="+", default=["aiinfra", "hf_batched", "vllm_cpu"],
                        help="which servers to measure (vllm_cpu also needs --vllm-python)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/aiinfra-bench-logs"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    headline: dict[str, float | int | None] = {"threads": args.threads, "output_len": args.output_len,
                                               "rounds": args.rounds}
    for size in args.models:
        hidden, layers = MODELS[size][:2]
        folder = build_model_dir(args.model_root / f"aiinfra-bench-llama-{hidden}x{layers}", size)
        for dtype in args.dtypes:
            results = measure_all(folder, dtype, args)
            ours = results.get("aiinfra", {})
            for name, by_concurrency in results.items():
                for concurrency, report in by_concurrency.items():
                    mine = ours.get(concurrency)
                    ratio = (f"{mine['output_tokens_per_s'] / report['output_tokens_per_s']:.2f}x"
                             if mine and name != "aiinfra" else "-")
                    rows.append(f"| {size} | {dtype} | {name} | {concurrency} | {report['output_tokens_per_s']:.1f} | "
                                f"{report['p50_ttft_ms']:.1f} / {report['p99_ttft_ms']:.1f} | "
                                f"{report['p50_tpot_ms']:.2f} / {report['p99_tpot_ms']:.2f} | {ratio} |")
                    key = f"{size}_{dtype}_{name}_c{concurrency}"
                    headline[f"{key}_output_tokens_per_s"] = round(report["output_tokens_per_s"], 1)
                    if mine and name != "aiinfra":
                        headline[f"{size}_{dtype}_aiinfra_over_{name}_c{concurrency}"] = round(
                            mine["output_tokens_per_s"] / report["output_tokens_per_s"], 2)
    print("\n| model | dtype | server | concurrency | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
          "| ours over it |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
