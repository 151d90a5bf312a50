"""The planner's one error type: bad input that the command line reports in one line with exit code 2."""

from __future__ import annotations


class PlanError(ValueError):
    """An input the planner cannot use (unknown model or hardware, impossible layout); the message names it."""
