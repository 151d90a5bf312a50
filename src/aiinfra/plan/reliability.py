"""Failures and checkpoints: expected interruptions, the Young/Daly checkpoint interval, and goodput.

The default failure rate comes from Llama 3's published 54-day snapshot (reliability_facts.csv): 419 unexpected
interruptions on 16,384 H100s, i.e. one per about 50,700 device-hours, with job MTBF falling as 1/N devices.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

RELIABILITY_FACTS_CSV = Path(__file__).with_name("reliability_facts.csv")


@cache
def reliability_facts() -> dict[str, str]:
    """The reliability facts table: fact name -> value (as text; the CSV also holds unit and source)."""
    with open(RELIABILITY_FACTS_CSV, newline="") as handle:
        return {row["fact"]: row["value"] for row in csv.DictReader(handle)}


def llama3_failures_per_device_hour() -> float:
    """Unexpected interruptions per device-hour in Llama 3's snapshot: 419 / (16384 x 54 x 24)."""
    facts = reliability_facts()
    device_hours = float(facts["llama3_snapshot_devices"]) * float(facts["llama3_snapshot_days"]) * 24
    return float(facts["llama3_unexpected_interruptions"]) / device_hours


def default_storage_write_bytes_per_s() -> float:
    """Llama 3's sustained checkpoint storage bandwidth (Tectonic, 2 TB/s)."""
    return float(reliability_facts()["llama3_storage_sustained_bw_tb_s"]) * 1e12


@dataclass(frozen=True)
class ReliabilitySettings:
    """Failure and checkpoint assumptions; every default names its source."""

    failures_per_device_hour: float = 0.0  # 0 means "use Llama 3's rate"
    storage_write_bytes_per_s: float = 0.0  # 0 means "use Llama 3's 2 TB/s"
    checkpoint_bytes_per_param: float = 14.0  # bf16 weights + fp32 master and Adam moments (Rajbhandari 2020)
    async_checkpoint: bool = False  # only the copy to host memory blocks training
    host_copy_bytes_per_s_per_device: float = 25e9  # PCIe Gen5 x16 device-to-host, about 25 GB/s each way
    restart_s: float = 600.0  # relaunch, reload and warm-up after a failure: an assumption (10 minutes)

    def rate(self) -> float:
        return self.failures_per_device_hour or llama3_failures_per_device_hour()

    def storage_bw(self) -> float:
        return self.storage_write_bytes_per_s or default_storage_write_bytes_per_s()


def young_daly_interval_s(checkpoint_cost_s: float, mtbf_s: float) -> float:
    """Optimal checkpoint interval: Daly's sqrt(2 delta M) - delta for delta < 2M, else M (Daly 2006)."""
    if checkpoint_cost_s >= 2 * mtbf_s:
        return mtbf_s
    return math.sqrt(2 * checkpoint_cost_s * mtbf_s) - checkpoint_cost_s


@dataclass(frozen=True)
class ReliabilityPlan:
    """Expected failures and the time they cost over a run."""

    job_mtbf_s: float
    checkpoint_bytes: float
    checkpoint_cost_s: float  # time training is blocked per checkpoint
    checkpoint_interval_s: float
    expected_interruptions: float
    goodput: float  # productive time / wall time

    @property
    def waste_fraction(self) -> float:
        return 1 - self.goodput


def plan_reliability(n_devices: int, n_params: float, ideal_run_s: float,
                     settings: ReliabilitySettings | None = None) -> ReliabilityPlan:
    """Young/Daly checkpointing for a run of `ideal_run_s` failure-free seconds on `n_devices` devices.

    Waste per unit of wall time: delta / tau for writing checkpoints, plus (tau / 2 + R) / M for the work lost
    since the last checkpoint and the restart after each failure (Young 1974; Daly 2006).
    """
    settings = settings or ReliabilitySettings()
    mtbf_s = 3600 / (settings.rate() * n_devices)
    checkpoint_bytes = n_params * settings.checkpoint_bytes_per_param
    if settings.async_checkpoint:
        # Asynchronous checkpointing blocks only while each device copies its shard to host memory.
        cost = checkpoint_bytes / n_devices / settings.host_copy_bytes_per_s_per_device
    else:
        cost = checkpoint_bytes / settings.storage_bw()
    interval = young_daly_interval_s(cost, mtbf_s)
    waste = cost / (interval + cost) + (interval / 2 + settings.restart_s) / mtbf_s
    goodput = max(0.0, 1 - waste)
    wall_s = ideal_run_s / goodput if goodput > 0 else math.inf
    return ReliabilityPlan(
        job_mtbf_s=mtbf_s,
        checkpoint_bytes=checkpoint_bytes,
        checkpoint_cost_s=cost,
        checkpoint_interval_s=interval,
        expected_interruptions=wall_s / mtbf_s,
        goodput=goodput,
    )
