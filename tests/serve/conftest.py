"""Serving tests run torch on one thread: tiny matmuls gain nothing from two, and on a busy 2-core machine
two threads spin against other processes and run up to a hundred times slower."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_torch_thread: None) -> None:
    """Every test here runs with `one_torch_thread` (tests/conftest.py)."""
