"""Checkpoint tests run torch on one thread, like the subprocesses they compare with: bitwise comparisons need
the same kernels, and on a busy 2-core machine a second thread only spins against other processes."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_torch_thread: None) -> None:
    """Every test here runs with `one_torch_thread` (tests/conftest.py)."""
