"""Text corpora, read as a stream of documents. The embedded default is the running interpreter's own standard-library
source code.

Why that corpus: every Python installation carries it, so `aiinfra train` needs no download; it is a few MB of
real, varied, well-written text (code, docstrings, comments) that a small model learns visibly in minutes; and
its files give a natural document boundary for a validation split that shares no text with training.

`data.corpus` is 'stdlib', a text file, a JSONL file (one JSON object per line, its "text" field a document), a
Parquet file (its "text" column; needs pyarrow), or a folder holding any of these (text files .py .txt .md .rst are
one document each). Documents are read one at a time, so a corpus larger than memory streams.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
TEXT_FIELD = "text"
PARQUET_BATCH_ROWS = 1024
FINGERPRINT_CHUNK_BYTES = 8 << 20
# Skipped: test suites (huge, repetitive, full of deliberately odd text), GUI demos, and generated files that
# are not code a person wrote (the codec tables in encodings/, pydoc's topic dump).
_SKIPPED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "__pycache__",
    "encodings",
    "pydoc_data",
}


class CorpusError(ValueError):
    """A corpus that cannot be read as documents; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its name (a file relative to the corpus root, with ':<record>' for a JSONL line
    or a Parquet row), and its text."""

    name: str
    text: str


def stdlib_root() -> Path:
    """Where the running interpreter keeps its standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _corpus_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"corpus {str(root)!r} is neither a file nor a directory")
    suffixes = TEXT_SUFFIXES | RECORD_SUFFIXES
    files = [
        path
        for path in root.rglob("*")
        if path.suffix in suffixes and path.is_file() and not _SKIPPED_DIRS.intersection(path.relative_to(root).parts)
    ]
    return sorted(files)


def resolve_corpus(corpus: str) -> Path:
    """'stdlib' means this interpreter's standard library; anything else is a file or directory."""
    return stdlib_root() if corpus == "stdlib" else Path(corpus).expanduser()


def _jsonl_texts(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
            text = record.get(TEXT_FIELD) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{line_number}: expected an object with a string {TEXT_FIELD!r} field")
            yield line_number, text


def _parquet_texts(path: Path) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    parquet = pq.ParquetFile(path)
    if TEXT_FIELD not in parquet.schema_arrow.names:
        raise CorpusError(f"{path}: no {TEXT_FIELD!r} column (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[TEXT_FIELD]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None:
                yield row, text


def iter_documents(corpus: str) -> Iterator[Document]:
    """The corpus' documents in a fixed (sorted) order, one at a time; undecodable bytes are replaced, never fatal."""
    root = resolve_corpus(corpus)
    base = root.parent if root.is_file() else root
    for path in _corpus_files(root):
        name = str(path.relative_to(base))
        if path.suffix in RECORD_SUFFIXES:
            records = _jsonl_texts(path) if path.suffix == ".jsonl" else _parquet_texts(path)
            for number, text in records:
                if text.strip():
                    yield Document(f"{name}:{number}", text)
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document(name, text)


def corpus_fingerprint(corpus: str) -> str:
    """A short hash of every corpus file's name and bytes (read in chunks, not parsed): the cache key of everything
    derived from the corpus."""
    root = resolve_corpus(corpus)
    base = root.parent if root.is_file() else root
    digest = xxhash.xxh3_128()
    for path in _corpus_files(root):
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(FINGERPRINT_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def is_validation(document: Document, val_fraction: float) -> bool:
    """Assign whole documents to validation by a stable hash of the name, so the split never shares text."""
    return (zlib.crc32(document.name.encode()) % 10_000) < val_fraction * 10_000
