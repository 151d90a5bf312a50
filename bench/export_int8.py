"""The int8 ONNX export (`aiinfra export RUN --format onnx --int8`) against the fp32 one, both in ONNX Runtime.

Workload: the trained run of bench/serve_int8.py (`aiinfra train` with no arguments, made once into
/tmp/aiinfra-bench-int8-default). Both exports are written by our own export function in this run. Size: bytes of
model.onnx. Quality: perplexity on the run's validation split (16 windows of the run's seq_len) from ONNX Runtime's
logits, and the fraction of positions whose argmax token agrees with fp32. Speed: one forward pass over a
(--batch, seq_len) batch of token ids (a prefill), fp32 and int8 sessions alternated --repeats times, best of each.
ONNX Runtime runs on --threads intra-op threads.

    python bench/export_int8.py [--run RUN_DIR] [--batch 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F

from aiinfra.checkpoint.export import export_onnx
from serve_int8 import trained_run


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess: onnxruntime.InferenceSession, tokens: torch.Tensor) -> torch.Tensor:
    (out,) = sess.run(["logits"], {"input_ids": tokens.numpy().astype(np.int64)})
    return torch.from_numpy(out)


def forward_s(sess: onnxruntime.InferenceSession, tokens: torch.Tensor, calls: int = 10) -> float:
    logits(sess, tokens)
    started = time.perf_counter()
    for _ in range(calls):
        logits(sess, tokens)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("/tmp/aiinfra-bench-int8-default"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, dataset, windows = trained_run(args.run)
    seq_len = run.config.train.seq_len
    with tempfile.TemporaryDirectory() as root:
        paths = {
            "fp32": export_onnx(args.run, Path(root) / "fp32") / "model.onnx",
            "int8": export_onnx(args.run, Path(root) / "int8", int8=True) / "model.onnx",
        }
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        losses: dict[str, list[float]] = {"fp32": [], "int8": []}
        agree, total = 0, 0
        for x, y in windows:
            out = {name: logits(sess, x) for name, sess in sessions.items()}
            for name in out:
                losses[name].append(F.cross_entropy(out[name].flatten(0, 1), y.flatten()).item())
            agree += int((out["int8"].argmax(-1) == out["fp32"].argmax(-1)).sum())
            total += y.numel()
        ppl = {name: math.exp(sum(values) / len(values)) for name, values in losses.items()}
        speeds: dict[int, dict[str, float]] = {}
        for batch in args.batch:
            tokens = torch.from_numpy(np.asarray(dataset.val[: batch * seq_len], dtype=np.int64)).view(batch, seq_len)
            best = {"fp32": math.inf, "int8": math.inf}
            for _ in range(args.repeats):
                for name, sess in sessions.items():
                    best[name] = min(best[name], forward_s(sess, tokens))
            speeds[batch] = best

    print(f"model.onnx: fp32 {sizes['fp32'] / 2**20:.2f} MiB, int8 {sizes['int8'] / 2**20:.2f} MiB "
          f"({sizes['int8'] / sizes['fp32']:.2f}x)")
    print(f"validation perplexity (ONNX Runtime): fp32 {ppl['fp32']:.3f}, int8 {ppl['int8']:.3f} "
          f"({100 * (ppl['int8'] / ppl['fp32'] - 1):+.2f}%); argmax agrees at {100 * agree / total:.1f}% of positions")
    headline: dict[str, float | int] = {
        "onnx_bytes_fp32": sizes["fp32"], "onnx_bytes_int8": sizes["int8"],
        "int8_over_fp32_bytes": round(sizes["int8"] / sizes["fp32"], 3),
        "perplexity_fp32": round(ppl["fp32"], 4), "perplexity_int8": round(ppl["int8"], 4),
        "perplexity_change_percent": round(100 * (ppl["int8"] / ppl["fp32"] - 1), 3),
        "argmax_agreement": round(agree / total, 4),
    }
    for batch, best in speeds.items():
        ratio = best["fp32"] / best["int8"]
        print(f"forward ({batch} x {seq_len} tokens): fp32 {1e3 * best['fp32']:.2f} ms, "
              f"int8 {1e3 * best['int8']:.2f} ms (int8 {ratio:.2f}x as fast)")
        headline[f"batch{batch}_fp32_forward_ms"] = round(1e3 * best["fp32"], 3)
        headline[f"batch{batch}_int8_forward_ms"] = round(1e3 * best["int8"], 3)
        headline[f"batch{batch}_int8_speedup"] = round(ratio, 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
