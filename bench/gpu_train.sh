#!/usr/bin/env bash
# One-GPU training benchmark: the ~1.1B-parameter preset "1b" (dim 2048, 22 layers, GQA 32/4, vocab 32000)
# on the stdlib corpus, through torchrun (one process), FSDP2 with its bf16 mixed-precision policy (bf16
# parameters and compute, fp32 gradient reduction and master weights), torch.compile per block.
#
#     bash bench/gpu_train.sh            # about 3-5 minutes on an H100, most of it tokenizer and compile
#
# Prints tokens/s and MFU (against the card's dense bf16 peak from the hardware catalog) over the steps after
# compilation and warm-up, and ends with one JSON line. Baseline: the card's peak (MFU is the ratio to it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this benchmark needs a GPU')"
RUN_DIR="${RUN_DIR:-$(mktemp -d)/gpu-1b}"
STEPS="${STEPS:-40}"
python -m aiinfra.distributed.launch --nproc 1 \
  --set model.preset=1b --set train.seq_len=2048 --set train.micro_batch=4 \
  --set train.steps="$STEPS" --set train.warmup_steps=5 --set train.eval_every=0 --set train.eval_batches=1 \
  --set train.dtype=bf16 --set train.compile=true --set parallel.mixed_precision=fsdp \
  --set parallel.measure_comm_every=0 --set run.progress=false --set run.log_every=5 --set run.sample_tokens=0 \
  --set run.dir="$RUN_DIR"
python - "$RUN_DIR" <<'PY'
import json, statistics, sys
from pathlib import Path

import torch

run_dir = Path(sys.argv[1])
records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run_dir / "summary.json").read_text())
# The first steps compile and warm up: measure the second half of the run.
timed = records[len(records) // 2 :]
tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
mfu = statistics.median(r["mfu"] for r in timed)
card = torch.cuda.get_device_name(0)
peak_gb = max(r["rank_peak_memory_bytes"][0] for r in records) / 2**30
print(f"{card}: preset 1b, 4 x 2048 tokens/step, FSDP bf16 policy + compile: {tokens_per_s:,.0f} tokens/s, "
      f"MFU {100 * mfu:.1f}% ({summary['peak_flops_source']}), peak memory {peak_gb:.1f} GiB, "
      f"final loss {records[-1]['loss']:.3f}")
print(json.dumps({"gpu": card, "preset": "1b", "tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 4),
                  "peak_memory_gib": round(peak_gb, 1), "steps": len(records), "final_loss": records[-1]["loss"]}))
PY
