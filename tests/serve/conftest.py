"""Serving tests run torch on one thread: tiny matmuls gain nothing from two, and on a busy 2-core machine
two threads spin against other processes and run up to a hundred times slower."""

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
