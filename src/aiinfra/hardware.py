"""The hardware catalog: accelerators with their peaks, memory, links and power, each row with its source.

The data lives in `hardware.csv` beside this module (copied from public datasheets and papers; the `sources`
column names them). `memory_gb` is as vendors state it, and an "80 GB" part has 80 GiB (`memory_bytes`).
Users extend it with their own CSV through `load_catalog(extra_csv)`. Torch-free: the trainer reads it for MFU, the
planner for everything.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CATALOG_CSV = Path(__file__).with_name("hardware.csv")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model. Rates are dense (no sparsity); bandwidths are per direction unless named."""

    id: str
    kind: str  # gpu, tpu, edge
    bf16_dense_tflops: float | None
    fp8_dense_tflops: float | None
    int8_dense_tops: float | None
    memory_gb: float
    memory_bw_gbs: float
    scaleup_domain: int
    scaleup_bw_gbs_per_dir: float | None
    scaleout_gbps_per_device: float | None
    tdp_w: float | None
    sources: str
    notes: str = ""
    fp4_dense_tflops: float | None = None  # NVFP4/MXFP4 dense peak (Blackwell); None where the chip has none
    host_bw_gbs: float | None = None  # device <-> host memory link per direction (PCIe); None where not catalogued

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes: vendors' "GB" on HBM parts are GiB (an 80 GB H100 holds 80 x 2**30 bytes)."""
        return self.memory_gb * 2**30

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak in FLOP/s for `dtype` (bf16, fp8, fp4 or int8); raises if the catalog has no figure."""
        value = {"bf16": self.bf16_dense_tflops, "fp8": self.fp8_dense_tflops, "fp4": self.fp4_dense_tflops,
                 "int8": self.int8_dense_tops}.get(dtype)
        if value is None:
            raise ValueError(f"hardware {self.id!r} has no {dtype} peak in the catalog")
        return value * 1e12


def _number(text: str) -> float | None:
    return float(text) if text.strip() else None


def _row_to_accelerator(row: dict[str, str]) -> Accelerator:
    return Accelerator(
        id=row["id"].strip(),
        kind=row["kind"].strip(),
        bf16_dense_tflops=_number(row["bf16_dense_tflops"]),
        fp8_dense_tflops=_number(row["fp8_dense_tflops"]),
        int8_dense_tops=_number(row["int8_dense_tops"]),
        memory_gb=float(row["memory_gb"]),
        memory_bw_gbs=float(row["memory_bw_gbs"]),
        scaleup_domain=int(row["scaleup_domain"] or 1),
        scaleup_bw_gbs_per_dir=_number(row["scaleup_bw_gbs_per_dir"]),
        scaleout_gbps_per_device=_number(row["scaleout_gbps_per_device"]),
        tdp_w=_number(row["tdp_w"]),
        sources=row["sources"],
        notes=row.get("notes") or "",
        fp4_dense_tflops=_number(row.get("fp4_dense_tflops") or ""),
        host_bw_gbs=_number(row.get("host_bw_gbs") or ""),
    )


def read_csv(path: Path) -> dict[str, Accelerator]:
    """Parse one catalog CSV into accelerators keyed by id."""
    with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's byte-order mark is not the id
        return {acc.id: acc for acc in map(_row_to_accelerator, csv.DictReader(handle))}


@cache
def _builtin() -> dict[str, Accelerator]:
    return read_csv(CATALOG_CSV)


def load_catalog(extra_csv: Path | None = None) -> dict[str, Accelerator]:
    """The built-in catalog, with rows from `extra_csv` added or replacing those of the same id."""
    catalog = dict(_builtin())
    if extra_csv is not None:
        catalog.update(read_csv(extra_csv))
    return catalog


# Other spellings of catalog parts, after lower-casing and hyphenating: the bare part where the catalog holds one
# form of it (H100 SXM 80 GB; A100 has four, so "a100" and "a100-pcie" stay unknown), PCIe and NVL cards with their
# capacity written either side, NVL72 racks by their GPU, TPUs without the "tpu-" and Trillium by its version.
HARDWARE_ALIASES = {
    "h100": "h100-sxm-80gb", "h100-sxm": "h100-sxm-80gb", "h100-sxm5": "h100-sxm-80gb", "h100-80gb": "h100-sxm-80gb",
    "a100-80gb": "a100-sxm-80gb", "a100-40gb": "a100-sxm-40gb", "h200-sxm": "h200", "b200-sxm": "b200",
    "gb200-nvl72": "gb200", "gb300-nvl72": "gb300", "mi300": "mi300x", "trillium": "tpu-v6e", "h800-sxm": "h800",
    "h100-pcie-80gb": "h100-pcie", "h100-80gb-pcie": "h100-pcie", "h100-nvl-94gb": "h100-nvl",
    "h100-94gb-nvl": "h100-nvl", "a100-80gb-pcie": "a100-pcie-80gb", "a100-40gb-pcie": "a100-pcie-40gb",
    "h20-96gb": "h20", "l40s-48gb": "l40s", "mi325": "mi325x", "mi350": "mi350x", "mi355": "mi355x",
    **{version: f"tpu-{version}" for version in ("v4", "v5e", "v5p", "v6e")},
    **{f"tpu{version}": f"tpu-{version}" for version in ("v4", "v5e", "v5p", "v6e")},
}


# Words a published table puts around a part's name that do not change the part, removed in turn: the vendor
# ("NVIDIA H100", "AMD Instinct MI300X", "Google TPU"), the system it ships in (HGX/DGX B200), the memory type
# (H100 80GB HBM3), the SXM generation (A100-SXM4, H100 SXM5: the catalog's "sxm"), H200's only capacity, and a TPU
# slice's chip or core count (v5p-1024, tpu-v5e-256; "v5litepod" is v5e). PCIe and NVL cards keep their word: they
# are parts of their own (`HARDWARE_ALIASES`).
_HARDWARE_WORDS = (
    (r"^(nvidia|amd|google|cloud)-", ""), (r"^instinct-", ""), (r"^(hgx|dgx)-|-(hgx|dgx)$", ""), (r"-hbm3e?$", ""),
    (r"-sxm[45]", "-sxm"), (r"^(h200(-sxm)?)-141gb$", r"\1"), (r"^(tpu-)?v5-?lite(-?pod)?", r"\1v5e"),
    (r"^((tpu-)?v(4|5e|5p|6e))-\d+$", r"\1"),
)


def hardware_key(name: str) -> str:
    """A hardware cell as the catalog spells it: lower case, hyphens for spaces and underscores, the words in
    `_HARDWARE_WORDS` removed, then `HARDWARE_ALIASES`."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    if key in HARDWARE_ALIASES:
        return HARDWARE_ALIASES[key]
    for pattern, replacement in _HARDWARE_WORDS:
        key = re.sub(pattern, replacement, key)
    return HARDWARE_ALIASES.get(key, key)


def get_accelerator(name: str, extra_csv: Path | None = None) -> Accelerator:
    """Look up one accelerator by id (or a spelling `hardware_key` reads, any case), with an error that lists the
    known ids."""
    catalog = load_catalog(extra_csv)
    if name in catalog:
        return catalog[name]
    key = hardware_key(name)
    if key not in catalog:
        raise KeyError(f"unknown hardware {name!r}; known: {', '.join(sorted(catalog))}")
    return catalog[key]


# torch.cuda.get_device_name() substrings -> catalog ids, most specific first.
_CUDA_NAMES = [
    ("GB300", "gb300"),
    ("B300", "b300"),
    ("GB200", "gb200"),
    ("B200", "b200"),
    ("GH200", "h200"),  # Grace Hopper's GPU: H100's tensor rates (the trainer's MFU denominator) beside HBM3e
    ("H200", "h200"),
    ("H20", "h20"),  # after H200, which contains it
    ("H800", "h800"),
    ("H100 PCIe", "h100-pcie"),
    ("H100 NVL", "h100-nvl"),
    ("H100", "h100-sxm-80gb"),
    ("A100-SXM4-40GB", "a100-sxm-40gb"),
    ("A100-PCIE-40GB", "a100-pcie-40gb"),
    ("A100 80GB PCIe", "a100-pcie-80gb"),
    ("A100", "a100-sxm-80gb"),
    ("L40S", "l40s"),
    ("MI300X", "mi300x"),
    ("MI325X", "mi325x"),
    ("MI350X", "mi350x"),
    ("MI355X", "mi355x"),
]


def match_device_name(device_name: str) -> Accelerator | None:
    """The catalog entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for needle, accelerator_id in _CUDA_NAMES:
        if needle.lower() in device_name.lower():
            return _builtin()[accelerator_id]
    return None
