"""Indicative prices per device-hour (prices.csv, each with its source); users override them per hardware."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

from aiinfra.hardware import get_accelerator
from aiinfra.plan.errors import PlanError

PRICES_CSV = Path(__file__).with_name("prices.csv")


@cache
def default_prices() -> dict[str, float]:
    """Hardware id -> indicative on-demand price per device-hour in USD."""
    with open(PRICES_CSV, newline="") as handle:
        return {row["id"]: float(row["price_per_device_hour_usd"]) for row in csv.DictReader(handle)}


def parse_prices(items: list[str]) -> dict[str, float]:
    """Parse ['h100-sxm-80gb=2.5', ...] into a mapping, over the defaults."""
    prices = dict(default_prices())
    for item in items:
        name, sep, value = item.partition("=")
        try:
            prices[catalog_id(name.strip())] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise PlanError(f"--price {item!r}: expected HARDWARE=USD_PER_DEVICE_HOUR, e.g. h100-sxm-80gb=2.5")
    return prices


def catalog_id(hardware: str) -> str:
    """The catalog id a hardware name spells (`hardware.HARDWARE_ALIASES`), or the name itself when unknown."""
    try:
        return get_accelerator(hardware).id
    except KeyError:
        return hardware


def price_for(prices: dict[str, float], hardware: str) -> float | None:
    """The price per device-hour of a hardware name, by its catalog id; None when none is listed."""
    return prices.get(catalog_id(hardware))
