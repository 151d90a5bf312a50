"""Per-generation efficiency parameters and the shape-dependent GEMM efficiency built on them.

The values live in `efficiency.csv` (one row per hardware generation, with the reasoning behind each value in its
`basis` column). Every published run of a generation is predicted with the same row: no per-run tuning.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

EFFICIENCY_CSV = Path(__file__).with_name("efficiency.csv")


@dataclass(frozen=True)
class EfficiencyProfile:
    """How close one hardware generation gets to its datasheet peaks, as fractions of those peaks."""

    generation: str
    accelerators: tuple[str, ...]
    gemm_efficiency_max: float  # share of the bf16 peak reached by a large GEMM
    gemm_half_dim: float  # GEMM dimension at which efficiency is half of the ceiling
    fp8_gemm_efficiency_max: float | None  # share of the fp8 (or fp4) peak reached by a large low-precision GEMM
    attention_efficiency: float  # share of peak reached by a fused (flash) attention kernel
    memory_bw_efficiency: float  # share of HBM bandwidth reached by elementwise (memory-bound) kernels
    collective_bw_efficiency: float  # bus bandwidth of ring collectives over link bandwidth
    scaleup_latency_s: float  # per ring step inside the scale-up domain (NVLink, ICI)
    scaleout_latency_s: float  # per ring step across the scale-out network
    basis: str = ""
    # GEMM dimension at which an NVFP4 (block-scaled 4-bit) GEMM reaches half its ceiling, where measured; blank
    # means `gemm_half_dim`. The 4-bit tensor-core rate doubles fp8's, so a tile's math takes half as long while its
    # prologue, epilogue and block-scale loads do not, and a GEMM needs a larger M to amortize them (basis column).
    fp4_gemm_half_dim: float | None = None
    # Share of HBM bandwidth a decode-attention kernel reaches streaming the KV cache, where measured; blank means
    # `memory_bw_efficiency` (basis column).
    decode_attention_bw_efficiency: float | None = None
    # Share of peak FlashAttention-2 reaches where it trails the generation's best fused attention kernel (Hopper:
    # FA2 lacks the warp-specialized TMA pipeline of cuDNN's and FA3's kernels); blank means `attention_efficiency`.
    fa2_attention_efficiency: float | None = None
    # Share of HBM bandwidth at which a bandwidth-bound GEMM streams its operands (decode's skinny GEMMs), where
    # measured and lower than the elementwise kernels' share; blank means `memory_bw_efficiency` (basis column).
    weight_stream_bw_efficiency: float | None = None
    # Seconds a layer's two norm kernels and its activation kernel take at least, however few tokens they see (each a
    # launch with a fixed cost), where measured; blank: none, they take their bytes at `memory_bw_efficiency`.
    layer_elementwise_floor_s: float = 0.0

    @property
    def gemm_bw_efficiency(self) -> float:
        """Share of HBM bandwidth at which a memory-bound GEMM moves its operands."""
        return self.weight_stream_bw_efficiency or self.memory_bw_efficiency

    def flash_efficiency(self, fa2: bool) -> float:
        """Share of peak of the fused attention kernel a run uses: FlashAttention-2's where `fa2`, else the best."""
        return (self.fa2_attention_efficiency or self.attention_efficiency) if fa2 else self.attention_efficiency

    @property
    def kv_read_bw_efficiency(self) -> float:
        """Share of HBM bandwidth at which decode attention reads the KV cache."""
        return self.decode_attention_bw_efficiency or self.memory_bw_efficiency

    def gemm_efficiency(self, m: float, k: float, n: float, dtype: str = "bf16") -> float:
        """Share of peak for an (m x k) @ (k x n) GEMM.

        A saturating curve in the smallest dimension: a GEMM whose narrowest side is much wider than a
        tensor-core tile runs at the ceiling, a thin one leaves most of the chip idle (NVIDIA Deep Learning
        Performance Guide, "Matrix Multiplication Background": throughput rises with each dimension until the
        tiles fill every SM).
        """
        ceiling = self.gemm_efficiency_max
        if dtype in ("fp8", "fp4", "int8") and self.fp8_gemm_efficiency_max is not None:
            ceiling = self.fp8_gemm_efficiency_max
        half = self.gemm_half_dim
        if dtype == "fp4" and self.fp4_gemm_half_dim is not None:
            half = self.fp4_gemm_half_dim
        smallest = max(min(m, k, n), 1e-9)
        return ceiling * smallest / (smallest + half)


def _optional_float(row: dict[str, str], column: str) -> float | None:
    text = (row.get(column) or "").strip()
    return float(text) if text else None


def _row_to_profile(row: dict[str, str]) -> EfficiencyProfile:
    return EfficiencyProfile(
        generation=row["generation"],
        accelerators=tuple(row["accelerators"].split()),
        gemm_efficiency_max=float(row["gemm_efficiency_max"]),
        gemm_half_dim=float(row["gemm_half_dim"]),
        fp8_gemm_efficiency_max=_optional_float(row, "fp8_gemm_efficiency_max"),
        attention_efficiency=float(row["attention_efficiency"]),
        memory_bw_efficiency=float(row["memory_bw_efficiency"]),
        collective_bw_efficiency=float(row["collective_bw_efficiency"]),
        scaleup_latency_s=float(row["scaleup_latency_s"]),
        scaleout_latency_s=float(row["scaleout_latency_s"]),
        basis=row["basis"],
        fp4_gemm_half_dim=_optional_float(row, "fp4_gemm_half_dim"),
        decode_attention_bw_efficiency=_optional_float(row, "decode_attention_bw_efficiency"),
        fa2_attention_efficiency=_optional_float(row, "fa2_attention_efficiency"),
        weight_stream_bw_efficiency=_optional_float(row, "weight_stream_bw_efficiency"),
        layer_elementwise_floor_s=_optional_float(row, "layer_elementwise_floor_s") or 0.0,
    )


@cache
def efficiency_table() -> dict[str, EfficiencyProfile]:
    """All generations in `efficiency.csv`, keyed by generation name."""
    with open(EFFICIENCY_CSV, newline="") as handle:
        return {p.generation: p for p in map(_row_to_profile, csv.DictReader(handle))}


def profile_for(accelerator_id: str, kind: str = "gpu") -> EfficiencyProfile:
    """The efficiency row that lists `accelerator_id`; unknown GPUs get Hopper's, unknown TPUs TPU v4's."""
    table = efficiency_table()
    for profile in table.values():
        if accelerator_id in profile.accelerators:
            return profile
    return table[{"tpu": "tpu-v4", "edge": "edge"}.get(kind, "hopper")]


def generation_of(accelerator_id: str, kind: str = "gpu") -> str:
    """The generation name an accelerator's efficiencies come from."""
    return profile_for(accelerator_id, kind).generation
