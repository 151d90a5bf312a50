"""Text corpora. The embedded default is the running interpreter's own standard-library source code.

Why that corpus: every Python installation carries it, so `aiinfra train` needs no download; it is a few MB of
real, varied, well-written text (code, docstrings, comments) that a small model learns visibly in minutes; and
its files give a natural document boundary for a validation split that shares no text with training.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Document:
    """One file of a corpus: its name relative to the corpus root, and its text."""

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
    suffixes = {".py", ".txt", ".md", ".rst"}
    files = [
        path
        for path in root.rglob("*")
        if path.suffix in suffixes and path.is_file() and not _SKIPPED_DIRS.intersection(path.relative_to(root).parts)
    ]
    return sorted(files)


def resolve_corpus(corpus: str) -> Path:
    """'stdlib' means this interpreter's standard library; anything else is a text file or directory."""
    return stdlib_root() if corpus == "stdlib" else Path(corpus).expanduser()


def iter_documents(corpus: str) -> Iterator[Document]:
    """The corpus' documents in a fixed (sorted) order; undecodable bytes are replaced, never fatal."""
    root = resolve_corpus(corpus)
    base = root.parent if root.is_file() else root
    for path in _corpus_files(root):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document(str(path.relative_to(base)), text)


def corpus_fingerprint(corpus: str) -> str:
    """A short hash of every document's name and content: the cache key of everything derived from it."""
    digest = hashlib.sha256()
    for document in iter_documents(corpus):
        digest.update(document.name.encode())
        digest.update(document.text.encode())
    return digest.hexdigest()[:16]


def is_validation(document: Document, val_fraction: float) -> bool:
    """Assign whole documents to validation by a stable hash of the name, so the split never shares text."""
    return (zlib.crc32(document.name.encode()) % 10_000) < val_fraction * 10_000
