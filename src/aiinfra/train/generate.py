"""Sample text from a finished run directory."""

from __future__ import annotations

from pathlib import Path

from aiinfra.checkpoint.run_dir import load_run
from aiinfra.data.tokenizer import END_OF_TEXT, decode, encode
from aiinfra.models import sample


def generate(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens (stopping at end-of-text)."""
    run = load_run(run_dir)
    ids = encode(run.tokenizer, prompt)
    if not ids:
        raise ValueError("--prompt is empty: give at least one character")
    new_ids = sample(run.model, ids, max_new_tokens, temperature, top_k, seed, run.tokenizer.token_to_id(END_OF_TEXT))
    return prompt + decode(run.tokenizer, new_ids)
