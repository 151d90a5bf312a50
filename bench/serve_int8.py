"""Int8 weight-only quantization (per output channel): memory saved, decode speed, and perplexity change.

Workload: a trained run (default: `aiinfra train` with no arguments, the embedded default, trained once into
/tmp/aiinfra-bench-int8-default, about 4 minutes on 2 cores). Memory: bytes of weights.
Quality: perplexity on the run's own validation split (16 windows of the run's seq_len). Speed: the engine
generating --batch greedy requests of --output-len tokens, fp32 baseline and int8 alternated --repeats times
in this process, best of each.

    python bench/serve_int8.py [--run RUN_DIR] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aiinfra.checkpoint.run_dir import LoadedRun, load_run
from aiinfra.data.dataset import TokenDataset, prepare_dataset
from aiinfra.data.sampler import eval_batches
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.quantize import quantize_int8, weight_bytes
from aiinfra.serve.request import SamplingParams


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in windows]
    return math.exp(sum(losses) / len(losses))


def decode_tokens_per_s(model: torch.nn.Module, prompts: list[list[int]], output_len: int) -> float:
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_memory_bytes=64 * 2**20))
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))
    return sum(len(output) for output in outputs) / (time.perf_counter() - start)


def trained_run(run_dir: Path) -> tuple[LoadedRun, TokenDataset, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The run (trained first if missing), its dataset, and 16 validation windows of its seq_len."""
    if not (run_dir / "model.safetensors").is_file():
        print(f"training the embedded default into {run_dir} (about 4 minutes on 2 cores) ...", flush=True)
        command = [sys.executable, "-m", "aiinfra", "train", "--set", f"run.dir={run_dir}", "--set",
                   "run.progress=false"]
        subprocess.run(command, check=True)
    run = load_run(run_dir)
    config = run.config
    dataset = prepare_dataset(config.data.corpus, config.model.vocab_size, config.data.val_fraction,
                              Path(config.data.cache_dir) if config.data.cache_dir else None)
    return run, dataset, list(eval_batches(dataset.val, config.train.seq_len, 4, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("/tmp/aiinfra-bench-int8-default"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, dataset, windows = trained_run(args.run)
    baseline = run.model
    quantized = quantize_int8(copy.deepcopy(baseline))
    bytes_fp32, bytes_int8 = weight_bytes(baseline), weight_bytes(quantized)
    ppl_fp32, ppl_int8 = perplexity(baseline, windows), perplexity(quantized, windows)
    print(f"weights: fp32 {bytes_fp32 / 2**20:.2f} MiB, int8 {bytes_int8 / 2**20:.2f} MiB "
          f"({bytes_int8 / bytes_fp32:.2f}x)")
    print(f"validation perplexity: fp32 {ppl_fp32:.3f}, int8 {ppl_int8:.3f} ({100 * (ppl_int8 / ppl_fp32 - 1):+.2f}%)")
    headline = {
        "weight_bytes_fp32": bytes_fp32, "weight_bytes_int8": bytes_int8,
        "int8_over_fp32_weight_bytes": round(bytes_int8 / bytes_fp32, 3),
        "perplexity_fp32": round(ppl_fp32, 4), "perplexity_int8": round(ppl_int8, 4),
        "perplexity_change_percent": round(100 * (ppl_int8 / ppl_fp32 - 1), 3),
    }
    tokens = dataset.val
    for batch in args.batch:
        prompts = [tokens[i * 97 : i * 97 + 32].tolist() for i in range(batch)]
        best = {"fp32": 0.0, "int8": 0.0}
        for _ in range(args.repeats):
            for name, model in (("fp32", baseline), ("int8", quantized)):
                best[name] = max(best[name], decode_tokens_per_s(model, prompts, args.output_len))
        ratio = best["int8"] / best["fp32"]
        print(f"batch {batch:>3}: fp32 {best['fp32']:8.1f} tok/s, int8 {best['int8']:8.1f} tok/s ({ratio:.2f}x)")
        headline[f"batch{batch}_fp32_tokens_per_s"] = round(best["fp32"], 1)
        headline[f"batch{batch}_int8_tokens_per_s"] = round(best["int8"], 1)
        headline[f"batch{batch}_int8_over_fp32_speed"] = round(ratio, 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
