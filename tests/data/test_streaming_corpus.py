"""Streaming corpora: a folder of text files, JSONL and Parquet, tokenized with bounded memory by two processes into
the same tokens as one process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiinfra.config import ConfigError, load_config
from aiinfra.data.corpus import CorpusError, iter_documents
from aiinfra.train import Trainer

WORKER = Path(__file__).with_name("streaming_worker.py")
WORDS = "the model reads tokens from a corpus that streams through memory in blocks of documents".split()


def generate_corpus(root: Path, documents_per_kind: int, words_per_document: int, seed: int = 0) -> int:
    """Text files under a subfolder, one JSONL file and one Parquet file, random words; returns the bytes of text."""
    draw = random.Random(seed)

    def text() -> str:
        return " ".join(draw.choice(WORDS) + str(draw.randrange(100)) for _ in range(words_per_document)) + "\n"

    (root / "notes").mkdir(parents=True)
    total = 0
    for index in range(documents_per_kind):
        body = text()
        (root / "notes" / f"note_{index:05d}.txt").write_text(body)
        total += len(body)
    records = [text() for _ in range(documents_per_kind)]
    (root / "records.jsonl").write_text("".join(json.dumps({"text": body, "id": i}) + "\n" for i, body in
                                                enumerate(records)))
    rows = [text() for _ in range(documents_per_kind)]
    pq.write_table(pa.table({"text": rows}), root / "rows.parquet", row_group_size=500)
    return total + sum(map(len, records)) + sum(map(len, rows))


def tokenize(corpus: Path, cache: Path, world_size: int, workdir: Path, sample_bytes: int) -> list[dict]:
    """`world_size` worker processes (ranks of one job) tokenizing `corpus` into `cache`; what each measured."""
    jobs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(corpus), str(cache), str(rank), str(world_size), "job",
             str(workdir / f"rank{rank}-of-{world_size}.json"), str(sample_bytes)],
            env={**os.environ, "RAYON_NUM_THREADS": "1"},
        )
        for rank in range(world_size)
    ]
    assert [job.wait(timeout=240) for job in jobs] == [0] * world_size
    return [json.loads((workdir / f"rank{rank}-of-{world_size}.json").read_text()) for rank in range(world_size)]


def test_streaming_corpus_of_text_jsonl_and_parquet_is_read_document_by_document(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "corpus", documents_per_kind=3, words_per_document=5)
    names = [document.name for document in iter_documents(str(tmp_path / "corpus"))]
    assert names == [f"notes/note_0000{i}.txt" for i in range(3)] + ["records.jsonl:1", "records.jsonl:2",
                                                                    "records.jsonl:3"] + [
        "rows.parquet:1", "rows.parquet:2", "rows.parquet:3"]


def test_streaming_corpus_tokenized_by_two_processes_equals_one_process_with_bounded_memory(tmp_path: Path) -> None:
    # 3 x 4000 documents of ~700 bytes: 8.5 MB of text, 47 blocks of 256 documents; the tokenizer trains on 1 MB.
    text_bytes = generate_corpus(tmp_path / "corpus", documents_per_kind=4000, words_per_document=100)
    one = tokenize(tmp_path / "corpus", tmp_path / "cache1", 1, tmp_path, 1 << 20)
    two = tokenize(tmp_path / "corpus", tmp_path / "cache2", 2, tmp_path, 1 << 20)
    datasets = [next((tmp_path / cache / "datasets").iterdir()) for cache in ("cache1", "cache2")]
    for split in ("train", "val"):
        first, second = (np.fromfile(path / f"{split}.bin", dtype=np.uint16) for path in datasets)
        assert len(first) > 0 and np.array_equal(first, second), split
    assert (datasets[0] / "tokenizer.json").read_bytes() == (datasets[1] / "tokenizer.json").read_bytes()
    assert not list((tmp_path / "cache2" / "datasets").glob(".*"))  # no staging folder left
    for figures in one + two:
        grown = figures["peak_rss_bytes"] - figures["baseline_peak_rss_bytes"]
        print(f"peak RSS +{grown / 2**20:.0f} MiB for {text_bytes / 2**20:.1f} MiB of text")
        assert grown < text_bytes / 2, figures


def test_streaming_corpus_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    config = load_config(None, [f"data.corpus={tmp_path / 'bad.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
                                "train.device=cpu"])
    with pytest.raises(ConfigError, match=r"data.corpus=.*bad.jsonl:2"):
        Trainer(config, run_dir=tmp_path / "run")
