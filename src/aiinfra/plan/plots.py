"""Plots (matplotlib, written as PNG and SVG): MFU and days against cluster size, and the cost/time frontier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiinfra.plan.calibrated import calibrated
from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import TrainSettings
from aiinfra.plan.prices import price_for
from aiinfra.plan.training import CostSettings, TrainingPlan, search_layout
from aiinfra.spec import ModelSpec


@dataclass(frozen=True)
class ScalingPoint:
    """The best plan for one hardware at one cluster size (None when nothing fits)."""

    hardware: str
    devices: int
    plan: TrainingPlan | None


def scaling_points(spec: ModelSpec, hardware: list[str], device_counts: list[int], settings: TrainSettings,
                   tokens: float, prices: dict[str, float]) -> list[ScalingPoint]:
    """Search the best layout for every hardware x cluster size."""
    points = []
    for hw in hardware:
        for n in device_counts:
            cluster = calibrated(make_cluster(hw, n))
            costs = CostSettings(price_per_device_hour=price_for(prices, hw))
            try:
                plan: TrainingPlan | None = search_layout(spec, cluster, settings, tokens, costs)
            except PlanError:
                plan = None
            points.append(ScalingPoint(hw, n, plan))
    return points


def _save(figure, out_prefix: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_prefix.with_suffix(".png"), out_prefix.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return paths


def plot_scaling(points: list[ScalingPoint], title: str, out_prefix: Path) -> list[Path]:
    """MFU and wall-clock days against cluster size, one line per hardware; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    figure, (ax_mfu, ax_days) = plt.subplots(1, 2, figsize=(11, 4.2))
    for hw in dict.fromkeys(p.hardware for p in points):
        ok = [p for p in points if p.hardware == hw and p.plan is not None]
        if not ok:
            continue
        devices = [p.devices for p in ok]
        ax_mfu.plot(devices, [p.plan.mfu for p in ok], marker="o", label=hw)  # type: ignore[union-attr]
        ax_days.plot(devices, [p.plan.wall_days for p in ok], marker="o", label=hw)  # type: ignore[union-attr]
    for axis, label in ((ax_mfu, "MFU"), (ax_days, "days (with failures)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("devices")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    ax_days.set_yscale("log")
    ax_mfu.legend(fontsize=8)
    figure.suptitle(title)
    paths = _save(figure, out_prefix)
    plt.close(figure)
    return paths


def pareto_front(pairs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, cost) points no other point beats on both axes, sorted by time."""
    front: list[tuple[float, float]] = []
    for time_days, cost in sorted(pairs):
        if not front or cost < front[-1][1]:
            front.append((time_days, cost))
    return front


def plot_frontier(points: list[ScalingPoint], title: str, out_prefix: Path) -> list[Path]:
    """Cost against time for every hardware x cluster size with a price, with the Pareto frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    priced = [p for p in points if p.plan is not None and p.plan.cost is not None]
    for hw in dict.fromkeys(p.hardware for p in priced):
        mine = [p for p in priced if p.hardware == hw]
        axis.scatter([p.plan.wall_days for p in mine], [p.plan.cost / 1e6 for p in mine], label=hw)  # type: ignore[union-attr,operator]
        for p in mine:
            axis.annotate(str(p.devices), (p.plan.wall_days, p.plan.cost / 1e6), fontsize=6)  # type: ignore[union-attr,operator]
    front = pareto_front([(p.plan.wall_days, p.plan.cost / 1e6) for p in priced])  # type: ignore[union-attr,operator]
    if front:
        axis.plot([f[0] for f in front], [f[1] for f in front], color="black", linewidth=1, label="frontier")
    axis.set_xscale("log")
    axis.set_xlabel("days (with failures)")
    axis.set_ylabel("cost (million USD)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title)
    paths = _save(figure, out_prefix)
    plt.close(figure)
    return paths
