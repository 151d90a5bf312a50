"""Tokenized corpora as memory-mapped token files, built once and cached by content.

A prepared dataset is a folder holding tokenizer.json, train.bin and val.bin (uint16 or uint32 token ids, each
document followed by the end-of-text token) and meta.json. It is written to a temporary folder and renamed into
place, so an interrupted build never leaves a cache entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from aiinfra.data.corpus import corpus_fingerprint, is_validation, iter_documents
from aiinfra.data.tokenizer import END_OF_TEXT, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1


@dataclass
class TokenDataset:
    """A tokenizer and the train and validation token streams (read-only memory maps)."""

    path: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def default_cache_dir() -> Path:
    """$AIINFRA_CACHE, else ~/.cache/aiinfra."""
    return Path(os.environ.get("AIINFRA_CACHE", Path.home() / ".cache" / "aiinfra"))


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _open(path: Path) -> TokenDataset:
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenDataset(
        path=path,
        tokenizer=load_tokenizer(path / "tokenizer.json"),
        train=np.memmap(path / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(path / "val.bin", dtype=dtype, mode="r"),
    )


def _write_tokens(path: Path, tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> int:
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    count = 0
    with open(path, "wb") as handle:
        for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
            ids = np.asarray([*encoding.ids, end_of_text], dtype=dtype)
            handle.write(ids.tobytes())
            count += ids.size
        handle.flush()
        os.fsync(handle.fileno())
    return count


def prepare_dataset(corpus: str, vocab_size: int, val_fraction: float, cache_dir: Path | None = None) -> TokenDataset:
    """Train the tokenizer and tokenize `corpus`, or reuse the cached result for the same content and settings."""
    cache_dir = cache_dir or default_cache_dir()
    key_text = f"{FORMAT_VERSION}:{corpus_fingerprint(corpus)}:{vocab_size}:{val_fraction}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = cache_dir / "datasets" / key
    if (path / "meta.json").exists():
        return _open(path)

    documents = list(iter_documents(corpus))
    if not documents:
        raise ValueError(f"corpus {corpus!r} holds no readable text")
    train_texts = [d.text for d in documents if not is_validation(d, val_fraction)]
    val_texts = [d.text for d in documents if is_validation(d, val_fraction)]
    if not train_texts or not val_texts:
        raise ValueError(
            f"corpus {corpus!r} has {len(documents)} document(s): too few to split with val_fraction={val_fraction}"
        )
    # The tokenizer sees only training text, so validation measures generalisation honestly.
    tokenizer = train_tokenizer(train_texts, vocab_size)
    dtype = _token_dtype(vocab_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        meta = {
            "corpus": corpus,
            "vocab_size": tokenizer.get_vocab_size(),
            "dtype": dtype.name,
            "train_documents": len(train_texts),
            "val_documents": len(val_texts),
            "train_tokens": _write_tokens(staging / "train.bin", tokenizer, train_texts, dtype),
            "val_tokens": _write_tokens(staging / "val.bin", tokenizer, val_texts, dtype),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            staging.rename(path)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _open(path)


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the token frequency distribution: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
