"""Checkpoint tests run torch on one thread, like the subprocesses they compare with: bitwise comparisons need
the same kernels, and on a busy 2-core machine a second thread only spins against other processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
