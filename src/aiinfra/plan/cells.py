"""Reading one cell of a run-table row (`published_training_runs.csv`, `published_inference_runs.csv` or any CSV of
the shared schema): counts, positive numbers, the published value and the precision word, each refusing a bad cell
with RowNotRepresentable naming the column, so that a row from anywhere runs or prints one line saying why."""

from __future__ import annotations

import re

from aiinfra.plan.errors import PlanError


class RowNotRepresentable(PlanError):
    """A run the planner cannot express; the message says why in one line."""


class RunRow(dict[str, str]):
    """A run-table row whose absent columns read as empty cells, so a CSV without an optional column (or a
    required one) gets the empty cell's meaning or a not-run line naming it, never a KeyError."""

    def __missing__(self, key: str) -> str:
        return ""


def run_row(row: dict[str, str | None]) -> RunRow:
    """A csv.DictReader row as a RunRow: None (a short line's missing cells) as empty, header names in the
    schema's lower case without the spaces a hand-edited header leaves ("Hardware ", "N_Devices")."""
    return RunRow({key.strip().lower(): value or "" for key, value in row.items() if key is not None})


def cell_key(text: str, drop_parentheses: bool = False) -> str:
    """A word cell as the vocabularies below spell it: lower case, hyphens for spaces and underscores, no hyphen at
    either end, and where asked without parenthesised detail ("FP8 (delayed scaling)" is "fp8")."""
    text = text.lower()
    if drop_parentheses:
        text = re.sub(r"\(.*?\)", " ", text)
    return re.sub(r"[\s_]+", "-", text.strip()).strip("-")


# A CSV saved by a spreadsheet starts with a byte-order mark, which would otherwise become part of the first column's
# name ("\ufeffid"): every run table is read with this encoding.
CSV_ENCODING = "utf-8-sig"
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


_COUNTED_PART = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\S.*?)\s*$|^\s*(\S.*?)\s*[x×*]\s*(\d+)\s*$", re.IGNORECASE)


def with_counted_hardware(row: dict[str, str]) -> dict[str, str]:
    """The row with a `hardware` cell that counts its parts ("8x H100", "H200 x 8") split into the part and, where
    `n_devices` is empty, the count; a stated `n_devices` wins (the count then names a node: "8xH100" over 64)."""
    text = row.get("hardware") or ""
    found = _COUNTED_PART.match(text)
    if not found:
        return row
    parts = found.group(1) or found.group(4)
    name = (found.group(2) or found.group(3)).strip()
    return {**row, "hardware": name, "n_devices": (row.get("n_devices") or "").strip() or parts}


def number(text: str) -> float:
    """A numeric cell: a plain or scientific number, or one with thousands separators as tables print them
    ("1,280"; a comma anywhere else is not read as a decimal point). ValueError otherwise."""
    text = text.strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return float(text)


def count(row: dict[str, str], key: str, default: int | None = None) -> int:
    """A count column (every integer column of the schema is one: degrees, sizes, batches): a whole number >= 1,
    `default` when empty (RowNotRepresentable when empty without one)."""
    text = (row.get(key) or "").strip()
    if not text:
        if default is None:
            raise RowNotRepresentable(f"{key} not stated")
        return default
    try:
        value = number(text)
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
        value = number(text)
    except ValueError:
        raise RowNotRepresentable(f"{key}={text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise RowNotRepresentable(f"{key}={text!r}: expected a positive number")
    return value


# Spellings of a precision that name its scaling recipe: MXFP8 and FP8 with current, delayed or block scaling are fp8
# in the schema (the reference README: "fp8 (includes MXFP8)"), NVFP4 and MXFP4 fp4; PyTorch's dtype names and mixed-
# precision labels are the 16-bit words; AWQ/GPTQ and W4A16/W8A16 are weight-only int4/int8.
PRECISION_ALIASES = {"mxfp8": "fp8", "fp8-cs": "fp8", "fp8-mx": "fp8", "fp8-blockwise": "fp8", "nvfp4": "fp4",
                     "mxfp4": "fp4", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "w4a16": "int4-weights",
                     "w8a16": "int8-weights", "awq": "int4-weights", "gptq": "int4-weights"}
_PRECISION_FAMILIES = (("fp8", ("fp8", "mxfp8", "float8", "e4m3", "e5m2")),
                       ("fp4", ("fp4", "nvfp4", "mxfp4", "float4")),
                       ("int4-weights", ("int4-awq", "int4-gptq", "int4-weight", "awq", "gptq")),
                       ("int8-weights", ("int8-weight",)))
_MIXED = re.compile(r"^(amp|mixed|autocast)-|-(mixed|amp)$")


def row_precision(row: dict[str, str], default: str = "bf16") -> str:
    """The `precision` cell in the schema's words (lower case, `PRECISION_ALIASES`, a scaling recipe or format
    after the word: "FP8 (delayed scaling)", "fp8_e4m3", "bf16-mixed", "INT4 AWQ"); `default` when empty."""
    text = _MIXED.sub("", cell_key(row.get("precision") or "", drop_parentheses=True))
    if not text:
        return default
    if text in PRECISION_ALIASES:
        return PRECISION_ALIASES[text]
    for word, prefixes in _PRECISION_FAMILIES:
        if text.startswith(prefixes):
            return word
    return text


def published_value(row: dict[str, str]) -> float:
    """The row's `value`: the published figure, a positive number (RowNotRepresentable otherwise); an `mfu` may be
    written as a percentage ("46.2%"), and as a fraction it is at most 1."""
    text = (row.get("value") or "").strip()
    mfu = (row.get("metric") or "").strip() == "mfu"
    percent = mfu and text.endswith("%")
    try:
        value = number(text[:-1] if percent else text) / (100 if percent else 1)
    except ValueError:
        raise RowNotRepresentable(f"value={text!r}: expected the published figure, a positive number") from None
    if not value > 0 or value == float("inf"):
        raise RowNotRepresentable(f"value={text!r}: expected the published figure, a positive number")
    if mfu and value > 1:
        raise RowNotRepresentable(f"value={text!r}: an mfu is a fraction of the peak, at most 1 (or a percentage "
                                  f"written with %, such as {value:g}%)")
    return value


# The `sharding` words of the schema and the ZeRO stage each means.
SHARDING_STAGES = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "fsdp-like": 2}


# Other spellings of a sharding scheme, after lower-casing, hyphenating and dropping parentheses: ZeRO stages with a
# hyphen or "stage", PyTorch FSDP's ShardingStrategy names (FULL_SHARD is ZeRO-3, SHARD_GRAD_OP ZeRO-2, NO_SHARD
# and DDP none, HYBRID_SHARD / HSDP ZeRO-3 inside a node and replicas across: Zhao et al. 2023, 3.2.1) and
# Megatron's distributed optimizer (ZeRO-1).
HYBRID_SHARD = "fsdp-hybrid-shard"
SHARDING_ALIASES = {"full-shard": "fsdp", "fsdp-full-shard": "fsdp", "shard-grad-op": "zero2", "no-shard": "none",
                    "ddp": "none", "hybrid-shard": HYBRID_SHARD, "hsdp": HYBRID_SHARD, "fsdp-hybrid": HYBRID_SHARD,
                    "distributed-optimizer": "zero1", "dist-opt": "zero1"}


def sharding_word(text: str) -> str:
    """A `sharding` cell in the schema's words (`SHARDING_ALIASES`; "ZeRO-3", "ZeRO stage 3": zero3)."""
    key = re.sub(r"^zero-?(stage-?)?([0-3])$", r"zero\2", cell_key(text, drop_parentheses=True))
    return "none" if key == "zero0" else SHARDING_ALIASES.get(key, key)


# Other spellings of the recompute column, after lower-casing, hyphenating and dropping parentheses. Whole-layer:
# activation or gradient checkpointing unqualified (torch.utils.checkpoint per block), remat (MaxText remat_policy
# full, jax.checkpoint's nothing_saveable), "full" with a qualifier. Selective: selective activation checkpointing
# (SAC, per-op), Megatron's --recompute-modules (core_attn, moe_act, layernorm, mla_up_proj) and MaxText's policies
# that save some matmul outputs (minimal, save_*, *_offloaded, qkv_proj). None: off, no, false, disabled.
FULL_RECOMPUTE = ("full", "remat", "rematerialization", "full-remat", "activation-checkpointing",
                  "gradient-checkpointing", "full-activation-checkpointing", "nothing-saveable", "block", "true",
                  "yes", "on")
SELECTIVE_RECOMPUTE = ("selective", "sac", "per-op", "op-level", "core-attn", "moe-act", "layernorm", "mla-up-proj",
                       "minimal", "save-", "qkv-proj")
NO_RECOMPUTE = ("", "none", "no", "off", "false", "disabled", "0")


def recompute_word(text: str) -> tuple[str, bool]:
    """(none/selective/full, sequence parallel stated) from the recompute column (any case, `FULL_RECOMPUTE`,
    `SELECTIVE_RECOMPUTE`, `NO_RECOMPUTE`; "selective+sp" states sequence parallelism)."""
    key = cell_key(text, drop_parentheses=True)
    if key.startswith(SELECTIVE_RECOMPUTE) or key.endswith("-offloaded") or "selective" in key:
        return "selective", "+sp" in key
    if key in FULL_RECOMPUTE or key.startswith("full-"):
        return "full", False
    if key in NO_RECOMPUTE:
        return "none", False
    raise RowNotRepresentable(f"recompute={text.strip()!r}: expected none, selective or full")
