"""Tokenized corpora as memory-mapped token files, built once, cached by content, with bounded memory.

A prepared dataset is a folder holding tokenizer.json, train.bin and val.bin (uint16 or uint32 token ids, each
document followed by the end-of-text token) and meta.json. It is built in a staging folder and renamed into place,
so an interrupted build never leaves a cache entry that looks complete.

The build streams: the tokenizer is trained on the first `TOKENIZER_SAMPLE_BYTES` of training text (all of it for
corpora below that), then documents are tokenized in blocks of `BLOCK_DOCUMENTS`, so memory holds one block, never
the corpus. Under torchrun every rank takes part: rank 0 trains the tokenizer while the others wait for its file,
each rank tokenizes the blocks `b` with `b % world_size == rank` into part files, and rank 0 concatenates the parts
in block order: the same tokens as one process. Waiting ranks poll the cache folder with no deadline; a peer that
dies ends the job through torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from tokenizers import Tokenizer

from aiinfra.data.corpus import Document, corpus_fingerprint, is_validation, iter_documents
from aiinfra.data.tokenizer import END_OF_TEXT, load_tokenizer, train_tokenizer

FORMAT_VERSION = 2
TOKENIZER_SAMPLE_BYTES = 64 << 20
BLOCK_DOCUMENTS = 256
POLL_INTERVAL_S = 0.2
SPLITS = ("train", "val")


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


def default_build_id() -> str:
    """The same string on every rank of one attempt of a torchrun job, another on the next attempt; the process id
    outside torchrun. It names the staging folder, so that no rank reads a crashed attempt's files."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return f"pid{os.getpid()}"
    return f"{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


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


def _wait_for(*paths: Path) -> None:
    """Block until one of `paths` exists (no deadline: see the module docstring)."""
    while not any(path.exists() for path in paths):
        time.sleep(POLL_INTERVAL_S)


def _training_sample(corpus: str, val_fraction: float, limit_bytes: int) -> Iterator[str]:
    """Training documents' texts in corpus order, up to about `limit_bytes` of UTF-8."""
    taken = 0
    for document in iter_documents(corpus):
        if is_validation(document, val_fraction):
            continue
        yield document.text
        taken += len(document.text.encode())
        if taken >= limit_bytes:
            return


def _blocks(corpus: str, rank: int, world_size: int) -> Iterator[tuple[int, list[Document]]]:
    """(block index, documents) of the blocks this rank tokenizes; the others' documents are read and skipped."""
    block: list[Document] = []
    index = 0
    for number, document in enumerate(iter_documents(corpus)):
        index = number // BLOCK_DOCUMENTS
        if index % world_size == rank:
            block.append(document)
        if (number + 1) % BLOCK_DOCUMENTS == 0 and block:
            yield index, block
            block = []
    if block:
        yield index, block


def _part(build: Path, split: str, block: int) -> Path:
    return build / f"{split}.{block:08d}.bin"


def _tokenize_share(
    corpus: str, tokenizer: Tokenizer, val_fraction: float, dtype: np.dtype, build: Path, rank: int, world_size: int,
    end_of_text: int,
) -> dict[str, int]:
    """Tokenize this rank's blocks into part files, each document followed by `end_of_text`; the counts written."""
    counts = {"blocks": 0, "train_documents": 0, "val_documents": 0, "train_tokens": 0, "val_tokens": 0}
    for index, documents in _blocks(corpus, rank, world_size):
        counts["blocks"] = max(counts["blocks"], index + 1)
        for split in SPLITS:
            texts = [d.text for d in documents if is_validation(d, val_fraction) == (split == "val")]
            with open(_part(build, split, index), "wb") as handle:
                for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
                    ids = np.asarray([*encoding.ids, end_of_text], dtype=dtype)
                    handle.write(ids.tobytes())
                    counts[f"{split}_tokens"] += ids.size
            counts[f"{split}_documents"] += len(texts)
    return counts


def _merge_parts(build: Path, blocks: int) -> None:
    """Concatenate the part files in block order into train.bin and val.bin (streamed; parts deleted)."""
    for split in SPLITS:
        with open(build / f"{split}.bin", "wb") as out:
            for index in range(blocks):
                part = _part(build, split, index)
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 8 << 20)
                part.unlink()
            out.flush()
            os.fsync(out.fileno())


def _build(
    corpus: str, vocab_size: int, val_fraction: float, build: Path, rank: int, world_size: int,
    tokenizer_file: Path | None, end_of_text_id: int | None,
) -> dict[str, object] | None:
    """This rank's part of the build; on rank 0, the finished meta (the others return None)."""
    if rank == 0:
        if tokenizer_file is not None:  # a given tokenizer (fine-tuning): used as it is
            tokenizer = load_tokenizer(tokenizer_file)
        else:
            sample = _training_sample(corpus, val_fraction, TOKENIZER_SAMPLE_BYTES)
            # The tokenizer sees only training text, so validation measures generalisation honestly.
            tokenizer = train_tokenizer(sample, vocab_size)
        tokenizer.save(str(build / ".tokenizer.json.tmp"))
        os.replace(build / ".tokenizer.json.tmp", build / "tokenizer.json")
    else:
        _wait_for(build / "tokenizer.json")
        tokenizer = load_tokenizer(build / "tokenizer.json")
    if end_of_text_id is None:
        end_of_text_id = tokenizer.token_to_id(END_OF_TEXT)
    if end_of_text_id is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} token and no end-of-text id was given")
    dtype = _token_dtype(max(vocab_size, tokenizer.get_vocab_size()))
    counts = _tokenize_share(corpus, tokenizer, val_fraction, dtype, build, rank, world_size, end_of_text_id)
    (build / f".done.{rank}.tmp").write_text(json.dumps(counts))
    os.replace(build / f".done.{rank}.tmp", build / f"done.{rank}.json")
    if rank != 0:
        return None
    for other in range(world_size):
        _wait_for(build / f"done.{other}.json")
    shares = [json.loads((build / f"done.{other}.json").read_text()) for other in range(world_size)]
    totals = {key: sum(share[key] for share in shares) for key in shares[0] if key != "blocks"}
    if not totals["train_documents"] or not totals["val_documents"]:
        documents = totals["train_documents"] + totals["val_documents"]
        raise ValueError(
            f"corpus {corpus!r} has {documents} document(s): too few to split with val_fraction={val_fraction}"
            if documents else f"corpus {corpus!r} holds no readable text"
        )
    _merge_parts(build, max(share["blocks"] for share in shares))
    for other in range(world_size):
        (build / f"done.{other}.json").unlink()
    return {"corpus": corpus, "vocab_size": tokenizer.get_vocab_size(), "dtype": dtype.name, **totals}


def prepare_dataset(
    corpus: str,
    vocab_size: int,
    val_fraction: float,
    cache_dir: Path | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    build_id: str | None = None,
    tokenizer_file: Path | None = None,
    end_of_text_id: int | None = None,
) -> TokenDataset:
    """Train the tokenizer and tokenize `corpus`, or reuse the cached result for the same content and settings.
    With `tokenizer_file` (a tokenizer.json), that tokenizer is used instead of one trained here, and documents end
    with `end_of_text_id` (default: its "<|endoftext|>").

    Call it on every rank of a job alike (`rank`, `world_size`), with a cache folder they all see."""
    cache_dir = cache_dir or default_cache_dir()
    key_text = f"{FORMAT_VERSION}:{corpus_fingerprint(corpus)}:{vocab_size}:{val_fraction}:{TOKENIZER_SAMPLE_BYTES}"
    if tokenizer_file is not None:
        key_text += f":{xxhash.xxh3_64_hexdigest(Path(tokenizer_file).read_bytes())}:{end_of_text_id}"
    key = xxhash.xxh3_64_hexdigest(key_text.encode())
    path = cache_dir / "datasets" / key
    if (path / "meta.json").exists():
        return _open(path)
    build = path.parent / f".{key}-{build_id or default_build_id()}"
    if rank == 0:
        build.mkdir(parents=True, exist_ok=True)
    else:
        _wait_for(build, path / "meta.json")
        if (path / "meta.json").exists():
            return _open(path)
    try:
        meta = _build(corpus, vocab_size, val_fraction, build, rank, world_size, tokenizer_file, end_of_text_id)
        if meta is not None:
            (build / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                build.rename(path)
            except OSError:  # another job finished the same entry first: use theirs
                shutil.rmtree(build)
    except BaseException:
        if rank == 0:
            shutil.rmtree(build, ignore_errors=True)
        raise
    _wait_for(path / "meta.json")
    return _open(path)


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int, chunk_tokens: int = 1 << 24) -> float:
    """Entropy of the token frequency distribution: the loss of the best model that ignores context (counted in
    chunks, so a memory-mapped corpus larger than memory is fine)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk_tokens):
        counts += np.bincount(np.asarray(tokens[start : start + chunk_tokens], dtype=np.int64), minlength=vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
