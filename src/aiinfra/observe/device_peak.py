"""The peak FLOP/s that MFU is measured against, and where that figure came from.

Known accelerators take their dense bf16 peak from the hardware catalog (datasheet figures with sources). A CPU
has no catalog entry worth trusting (clocks, cores and vector units vary), so its peak is measured: the best
rate of a large matmul in the training dtype, over a short run, cached per CPU model, thread count, dtype and
torch version.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aiinfra.hardware import match_device_name


@dataclass(frozen=True)
class DevicePeak:
    """Peak FLOP/s of one device in one dtype, and how it was obtained."""

    flops_per_s: float
    source: str  # e.g. "catalog: h100-sxm-80gb (bf16 dense)" or "measured: 2048^3 matmul, 2 threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 0.5) -> float:
    """Best FLOP/s of a size^3 matmul over about `seconds` of repeats."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up: first call pays for kernel selection
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak(dtype: torch.dtype, cache_dir: Path) -> DevicePeak:
    """The measured CPU matmul peak for `dtype`, from the cache when this CPU/threads/torch was measured."""
    threads = torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{_cpu_model()}|{threads}|{dtype_name}|{torch.__version__}"
    cache_file = cache_dir / "cpu_peak.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return DevicePeak(**cached[key])
    flops = measure_matmul_flops(dtype, torch.device("cpu"))
    peak = DevicePeak(flops, f"measured: 2048^3 {dtype_name} matmul on {threads} threads ({_cpu_model()})")
    cached[key] = asdict(peak)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=2))
    tmp.replace(cache_file)
    return peak


def device_peak(device: torch.device, dtype: torch.dtype, cache_dir: Path) -> DevicePeak:
    """Catalog peak for a known accelerator, else a measured (and cached) matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        accelerator = match_device_name(name)
        if accelerator is not None and accelerator.bf16_dense_tflops:
            return DevicePeak(accelerator.peak_flops("bf16"), f"catalog: {accelerator.id} bf16 dense ({name})")
        return DevicePeak(measure_matmul_flops(dtype, device, size=8192), f"measured: 8192^3 matmul on {name}")
    return cpu_peak(dtype, cache_dir)
