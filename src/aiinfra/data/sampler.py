"""A deterministic, resumable sampler of fixed-length windows from a token stream.

Each epoch visits every non-overlapping window of `seq_len + 1` tokens once, in an order drawn from
(seed, epoch). A step takes the next `global_batch` windows; data-parallel rank r of n gets the r-th contiguous
slice, so every layout sees the same global batch. The position (epoch, index) is the whole state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class WindowSampler:
    """Yields (inputs, targets) batches of shape (global_batch / dp_size, seq_len)."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1
    ):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {dp_size} data-parallel ranks")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.dp_rank = dp_rank
        self.local_batch = global_batch // dp_size
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < global_batch:
            raise ValueError(
                f"{len(tokens)} tokens make {self.num_windows} windows of {seq_len}: fewer than one batch of "
                f"{global_batch}"
            )
        self.epoch = 0
        self.index = 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch for this rank, as int64 (inputs, targets) shifted by one token."""
        if self.index + self.global_batch > self.num_windows:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        start = self.index + self.dp_rank * self.local_batch
        windows = self._epoch_order()[start : start + self.local_batch]
        self.index += self.global_batch
        offsets = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        batch = torch.from_numpy(self.tokens[offsets].astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise ValueError(
                f"sampler state was saved with seed={state['seed']}, seq_len={state['seq_len']}; "
                f"this run has seed={self.seed}, seq_len={self.seq_len}"
            )
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int):
    """A fixed set of evenly spaced validation windows, the same at every evaluation."""
    num_windows = (len(tokens) - 1) // seq_len
    count = min(num_windows, batch_size * num_batches)
    windows = np.linspace(0, num_windows - 1, count).astype(np.int64)
    for start in range(0, count, batch_size):
        offsets = windows[start : start + batch_size, None] * seq_len + np.arange(seq_len + 1)
        batch = torch.from_numpy(tokens[offsets].astype(np.int64))
        yield batch[:, :-1], batch[:, 1:]
