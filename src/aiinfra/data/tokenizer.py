"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved as tokenizer.json.

Byte-level means every string, in any script, round-trips exactly: the base alphabet is the 256 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (the 256 bytes and an end-of-text token included)."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least 258 entries")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json; special-token strings inside text are encoded as plain text."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`; a literal "<|endoftext|>" in it is plain text, not the special token."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of `ids` (the exact inverse of `encode`)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)
