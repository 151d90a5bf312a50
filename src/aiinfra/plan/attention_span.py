"""How many keys an attention layer reads: every earlier position (global causal attention), the last `window` of
them (sliding-window layers: GPT-OSS, Gemma 2 and 3), or those of the query's own chunk (chunked local attention:
Llama 4's iRoPE layers, config.json attention_chunk_size 8192). Shared by the training step (`step.py`) and the
serving step (`inference.py`)."""

from __future__ import annotations


def chunk_offsets_sum(n: int, chunk: int) -> float:
    """Sum over positions 0..n-1 of each position's offset inside its chunk (p mod chunk)."""
    full, rest = divmod(n, chunk)
    return full * chunk * (chunk - 1) / 2 + rest * (rest - 1) / 2


def mean_keys(start: int, stop: int, window: int = 0, chunk: int = 0) -> float:
    """Mean keys a query at positions start..stop-1 attends to (itself included): p + 1 under global causal
    attention, min(p + 1, window) in a sliding window, (p mod chunk) + 1 in a chunk."""
    stop = max(stop, start + 1)
    count = stop - start
    if chunk > 0:
        return (chunk_offsets_sum(stop, chunk) - chunk_offsets_sum(start, chunk)) / count + 1
    mean_global = (start + stop + 1) / 2
    if window <= 0 or stop <= window:
        return mean_global
    if start >= window:
        return float(window)
    # Positions below the window grow with p; the rest read the whole window.
    below = window - start
    return ((start + window + 1) / 2 * below + window * (count - below)) / count


def causal_pairs(n: int, window: int = 0, chunk: int = 0) -> float:
    """(query, key) pairs a causal prompt of n tokens scores: n (n + 1) / 2 globally, fewer in a window or a chunk."""
    return n * mean_keys(0, n, window, chunk)
