"""Tokenizing a corpus larger than this process could hold, by several processes, with bounded memory.

Workload: a generated JSONL corpus (default 2 GB: 64 files of random words from a small vocabulary, ~700-byte
documents), tokenized by `--nproc` processes as ranks of one job (`prepare_dataset(rank=r, world_size=n)`: rank 0
trains the byte-level BPE tokenizer on the first 64 MB of training text, every rank tokenizes every n-th block of
256 documents, rank 0 concatenates the parts). Reports each rank's peak RSS (what bounded memory means here: it
does not grow with the corpus), the wall time and the tokenization rate. The equality of these tokens with the
one-process path is checked in CI on a smaller corpus (tests/data/test_streaming_corpus.py).

    python bench/streaming_corpus.py [--gigabytes 2] [--nproc 2] [--dir /path/with/space]

Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the model reads tokens from a corpus that streams through memory in blocks of documents".split()
FILES = 64


def generate(root: Path, total_bytes: int, seed: int = 0) -> int:
    """JSONL files of random-word documents, about `total_bytes` of text in all; the bytes of text written."""
    draw = random.Random(seed)
    vocabulary = [f"{word}{number}" for word in WORDS for number in range(100)]
    root.mkdir(parents=True)
    written = 0
    for index in range(FILES):
        with open(root / f"part_{index:03d}.jsonl", "w") as handle:
            target = total_bytes * (index + 1) // FILES
            while written < target:
                text = " ".join(draw.choices(vocabulary, k=100))
                handle.write(json.dumps({"text": text}) + "\n")
                written += len(text)
    return written


def worker(corpus: str, cache_dir: str, rank: int, world_size: int) -> None:
    """One rank: tokenize, then print its peak RSS and what it saw as one JSON line."""
    from aiinfra.data.dataset import prepare_dataset

    started = time.perf_counter()
    dataset = prepare_dataset(corpus, 512, 0.01, Path(cache_dir), rank=rank, world_size=world_size, build_id="bench")
    print(json.dumps({
        "rank": rank,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": time.perf_counter() - started,
        "train_tokens": len(dataset.train),
        "val_tokens": len(dataset.val),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where the corpus and tokens go (default: a temp)")
    parser.add_argument("--worker", nargs=4, metavar=("CORPUS", "CACHE", "RANK", "WORLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        corpus, cache_dir, rank, world_size = args.worker
        worker(corpus, cache_dir, int(rank), int(world_size))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        root = Path(root)
        started = time.perf_counter()
        text_bytes = generate(root / "corpus", int(args.gigabytes * 1e9))
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        jobs = [
            subprocess.Popen([sys.executable, __file__, "--worker", str(root / "corpus"), str(root / "cache"),
                              str(rank), str(args.nproc)], stdout=subprocess.PIPE, text=True)
            for rank in range(args.nproc)
        ]
        ranks = [json.loads(job.communicate()[0].strip().splitlines()[-1]) for job in jobs]
        wall_s = time.perf_counter() - started
        if any(job.returncode for job in jobs):
            raise SystemExit(f"a worker failed: exit codes {[job.returncode for job in jobs]}")
    tokens = ranks[0]["train_tokens"] + ranks[0]["val_tokens"]
    print(f"corpus: {text_bytes / 1e9:.2f} GB of text in {FILES} JSONL files (generated in {generate_s:.0f} s)")
    print(f"{args.nproc} processes: {wall_s:.0f} s, {tokens / 1e6:.0f}M tokens, {text_bytes / wall_s / 1e6:.1f} MB/s")
    for rank in ranks:
        print(f"  rank {rank['rank']}: peak RSS {rank['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(json.dumps({
        "text_bytes": text_bytes,
        "processes": args.nproc,
        "wall_s": round(wall_s, 1),
        "tokens": tokens,
        "text_mb_per_s": round(text_bytes / wall_s / 1e6, 2),
        "rank_peak_rss_bytes": [rank["peak_rss_bytes"] for rank in ranks],
    }))


if __name__ == "__main__":
    main()
