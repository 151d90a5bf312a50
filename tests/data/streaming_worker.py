"""Tokenizes a corpus as one rank of a job and writes what it measured (run by test_streaming_corpus.py).

    python streaming_worker.py CORPUS CACHE_DIR RANK WORLD_SIZE BUILD_ID OUT.json [TOKENIZER_SAMPLE_BYTES]

OUT.json holds the peak RSS before and after `prepare_dataset` (bytes) and, on rank 0, the token counts.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from aiinfra.data import dataset


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    corpus, cache_dir, rank, world_size, build_id, out = sys.argv[1:7]
    if len(sys.argv) > 7:
        dataset.TOKENIZER_SAMPLE_BYTES = int(sys.argv[7])
    baseline = peak_rss_bytes()
    prepared = dataset.prepare_dataset(corpus, 512, 0.1, Path(cache_dir), rank=int(rank), world_size=int(world_size),
                                       build_id=build_id)
    figures = {"baseline_peak_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(),
               "train_tokens": len(prepared.train), "val_tokens": len(prepared.val)}
    Path(out).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
