"""What the trainer costs over a minimal plain-PyTorch loop, and which compute dtype is faster here.

Workload: the embedded default model (preset tiny) on the stdlib corpus, micro-batch 16 x 256 tokens, AdamW,
gradient clipping, all cores. Baseline: a plain loop (forward, cross-entropy, backward, clip, AdamW step) on an
identical model fed the same batches. The two alternate in short rounds (ABAB...) so that the noise of this
shared machine hits both alike, and the median step time of each is compared.

    python bench/train_overhead.py [--rounds 20] [--steps-per-round 1]

Prints the ratio trainer tokens/s / plain tokens/s (target >= 0.97), the trainer's MFU, and the bf16-autocast
speedup over fp32 for the same trainer step; ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aiinfra.config import load_config
from aiinfra.models import Transformer
from aiinfra.observe.step_log import StepLogger
from aiinfra.train import Trainer


def plain_loop_step(model, optimizer, inputs, targets, dtype: torch.dtype | None) -> None:
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        logits = model(inputs)
    F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(dtype_name: str, rounds: int, steps_per_round: int, workdir: Path) -> dict[str, float]:
    config = load_config(
        None,
        [
            f"train.dtype={dtype_name}",
            f"train.steps={rounds * steps_per_round + 1}",
            "train.eval_every=0",
            "train.device=cpu",
            "run.progress=false",
            f"run.dir={workdir / dtype_name}",
        ],
    )
    trainer = Trainer(config)
    # The baseline: the same model and initial weights, AdamW with the same hyperparameters, no trainer around it.
    model = Transformer(config.model)
    model.load_state_dict(trainer.model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=(0.9, 0.95), weight_decay=0.1)
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    batch = trainer.sampler.next_batch()
    logger = StepLogger(trainer.run_dir, config.train.steps, progress=False, log_every=10**9)

    trainer.run_step(logger)  # warm-up both
    plain_loop_step(model, optimizer, *batch, dtype)
    trainer_times, plain_times = [], []
    for _ in range(rounds):
        for _ in range(steps_per_round):
            start = time.perf_counter()
            trainer.run_step(logger)
            trainer_times.append(time.perf_counter() - start)
        for _ in range(steps_per_round):
            inputs, targets = trainer.sampler.next_batch()  # the baseline sees batches of the same stream
            start = time.perf_counter()
            plain_loop_step(model, optimizer, inputs, targets, dtype)
            plain_times.append(time.perf_counter() - start)
    logger.close()
    tokens = trainer.tokens_per_step
    trainer_tps = tokens / statistics.median(trainer_times)
    plain_tps = tokens / statistics.median(plain_times)
    return {
        "trainer_tokens_per_s": trainer_tps,
        "plain_tokens_per_s": plain_tps,
        "mfu": trainer_tps * trainer.flops_per_token / trainer.peak.flops_per_s,
        "peak_tflops": trainer.peak.flops_per_s / 1e12,
        "peak_source": trainer.peak.source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps-per-round", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        results = {name: measure(name, args.rounds, args.steps_per_round, Path(workdir)) for name in ("bf16", "fp32")}
    print(f"workload: preset tiny, 16 x 256 tokens/step, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, r in results.items():
        print(
            f"{name}: trainer {r['trainer_tokens_per_s']:,.0f} tok/s, plain loop {r['plain_tokens_per_s']:,.0f} tok/s,"
            f" ratio {r['trainer_tokens_per_s'] / r['plain_tokens_per_s']:.3f}; MFU {100 * r['mfu']:.1f}% of "
            f"{r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})"
        )
    bf16, fp32 = results["bf16"], results["fp32"]
    speedup = bf16["trainer_tokens_per_s"] / fp32["trainer_tokens_per_s"]
    print(f"bf16 autocast over fp32, same trainer step: {speedup:.2f}x")
    figures = {
        "trainer_vs_plain_ratio": round(bf16["trainer_tokens_per_s"] / bf16["plain_tokens_per_s"], 4),
        "trainer_vs_plain_ratio_fp32": round(fp32["trainer_tokens_per_s"] / fp32["plain_tokens_per_s"], 4),
        "trainer_tokens_per_s": round(bf16["trainer_tokens_per_s"]),
        "mfu": round(bf16["mfu"], 4),
        "mfu_fp32": round(fp32["mfu"], 4),
        "bf16_over_fp32_speedup": round(speedup, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
