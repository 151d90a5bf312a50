"""Reading one cell of a run-table row (`published_training_runs.csv`, `published_inference_runs.csv` or any CSV of
the shared schema): counts, positive numbers, the published value and the precision word, each refusing a bad cell
with RowNotRepresentable naming the column, so that a row from anywhere runs or prints one line saying why."""

from __future__ import annotations

from aiinfra.plan.errors import PlanError


class RowNotRepresentable(PlanError):
    """A run the planner cannot express; the message says why in one line."""


class RunRow(dict[str, str]):
    """A run-table row whose absent columns read as empty cells, so a CSV without an optional column (or a
    required one) gets the empty cell's meaning or a not-run line naming it, never a KeyError."""

    def __missing__(self, key: str) -> str:
        return ""


def run_row(row: dict[str, str | None]) -> RunRow:
    """A csv.DictReader row as a RunRow: None (a short line's missing cells) as empty."""
    return RunRow({key: value or "" for key, value in row.items() if key is not None})


def count(row: dict[str, str], key: str, default: int | None = None) -> int:
    """A count column (every integer column of the schema is one: degrees, sizes, batches): a whole number >= 1,
    `default` when empty (RowNotRepresentable when empty without one)."""
    text = (row.get(key) or "").strip()
    if not text:
        if default is None:
            raise RowNotRepresentable(f"{key} not stated")
        return default
    try:
        value = float(text)
    except ValueError:
        raise RowNotRepresentable(f"{key}={text!r} is not a number") from None
    if not (value >= 1 and value.is_integer()):
        raise RowNotRepresentable(f"{key}={text!r}: expected a whole number >= 1")
    return int(value)


def optional_count(row: dict[str, str], key: str) -> int | None:
    """A count column that may be empty (None then); otherwise as `count`."""
    return count(row, key, 0) or None


def positive(row: dict[str, str], key: str) -> float | None:
    """An optional positive number column (parameter counts, capacity factor); None when empty."""
    text = (row.get(key) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise RowNotRepresentable(f"{key}={text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise RowNotRepresentable(f"{key}={text!r}: expected a positive number")
    return value


# Spellings of a precision that name its scaling recipe: MXFP8 and FP8 with current or block scaling are fp8 in the
# schema (the reference README: "fp8 (includes MXFP8)"), NVFP4 and MXFP4 fp4.
PRECISION_ALIASES = {"mxfp8": "fp8", "fp8-cs": "fp8", "fp8-mx": "fp8", "fp8-blockwise": "fp8", "nvfp4": "fp4",
                     "mxfp4": "fp4"}


def row_precision(row: dict[str, str], default: str = "bf16") -> str:
    """The `precision` cell in the schema's words (lower case, `PRECISION_ALIASES`); `default` when empty."""
    text = (row.get("precision") or "").strip().lower()
    return PRECISION_ALIASES.get(text, text) or default


def published_value(row: dict[str, str]) -> float:
    """The row's `value`: the published figure, a positive number (RowNotRepresentable otherwise)."""
    text = (row.get("value") or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise RowNotRepresentable(f"value={text!r}: expected the published figure, a positive number") from None
    if not value > 0 or value == float("inf"):
        raise RowNotRepresentable(f"value={text!r}: expected the published figure, a positive number")
    return value
