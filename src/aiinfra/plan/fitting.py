"""Fitting the GEMM ceilings to published runs, and the out-of-sample check that holds each source out.

Free values: the share of the dense peak that large GEMMs reach, one for 16-bit and one for low-precision (fp8 and
fp4) GEMMs, per hardware generation. Everything else is set a priori (`efficiency.csv`). A generation's ceiling is
fitted (least mean absolute log ratio |log(predicted / published)| on a grid, `fit_loss`) on its own rows when they
number at least `MIN_ROWS_PER_GENERATION`; otherwise it takes the value pooled over every generation's rows, so a
generation with few rows borrows from the others instead of from nothing. A generation with no rows at all in a fit
keeps its a-priori catalog value, which is what the planner predicts unseen hardware with (`calibrated`), so a source
held out alone with its generation is scored the way a new user's run on that hardware would be.
Leave-one-source-out: for each source, fit on all other sources' rows and predict that source's rows; the headline is
the error of those predictions.

Why the log ratio and not the percentage error that the headline reports: a ceiling scales a prediction, and the
percentage error is not symmetric in that scale (predicting 2x too fast costs 100%, 2x too slow 50%), so minimising it
pulls a ceiling low, towards under-prediction (Tofallis 2015, "A better measure of relative prediction accuracy for
model selection and model estimation", J. Oper. Res. Soc. 66: the log accuracy ratio has no such bias). The log ratio
weighs a factor too fast and the same factor too slow alike; it is still a sum of absolute values (a median-like,
outlier-robust fit, unlike squared error).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

from aiinfra.plan.efficiency import EfficiencyProfile
from aiinfra.plan.validation import PreparedRow, ValidationRow, predict_prepared, source_group

CEILING_GRID = tuple(round(0.30 + 0.02 * i, 2) for i in range(31))  # 0.30 .. 0.90 of the dense peak
MIN_ROWS_PER_GENERATION = 3
LOW_PRECISION = ("fp8", "fp4")


@dataclass(frozen=True)
class Ceilings:
    """Fitted GEMM ceilings per generation: 16-bit and low precision."""

    bf16: dict[str, float]
    low: dict[str, float]

    def profile(self, base: EfficiencyProfile) -> EfficiencyProfile:
        """The generation's profile with its fitted ceilings (base values where none was fitted)."""
        bf16 = self.bf16.get(base.generation, base.gemm_efficiency_max)
        low = self.low.get(base.generation, base.fp8_gemm_efficiency_max or bf16)
        return replace(base, gemm_efficiency_max=bf16, fp8_gemm_efficiency_max=low)


def fit_loss(error: float) -> float:
    """What the fit minimises for one row: |log(predicted / published)|, from the signed relative error."""
    return abs(math.log1p(error))


def _profile_with(item: PreparedRow, bf16: float, low: float) -> EfficiencyProfile:
    return replace(item.setup.cluster.efficiency, gemm_efficiency_max=bf16, fp8_gemm_efficiency_max=low)


class ErrorTable:
    """`fit_loss` of every prepared row at every grid value of the ceiling it depends on (computed once)."""

    def __init__(self, prepared: list[PreparedRow]) -> None:
        self.prepared = prepared
        self.bf16_errors: dict[int, list[float]] = {}
        for index, item in enumerate(prepared):
            base = item.setup.cluster.efficiency
            if item.setup.settings.precision in LOW_PRECISION:
                continue
            self.bf16_errors[index] = [fit_loss(predict_prepared(item, _profile_with(
                item, c, base.fp8_gemm_efficiency_max or c)).error) for c in CEILING_GRID]
        self._low_cache: dict[tuple[int, float], list[float]] = {}

    def low_errors(self, index: int, bf16: float) -> list[float]:
        """`fit_loss` of a low-precision row over the grid, given its generation's 16-bit ceiling."""
        key = (index, bf16)
        if key not in self._low_cache:
            item = self.prepared[index]
            self._low_cache[key] = [fit_loss(predict_prepared(item, _profile_with(item, bf16, c)).error)
                                    for c in CEILING_GRID]
        return self._low_cache[key]


def _argmin_mean(columns: list[list[float]]) -> float | None:
    if not columns:
        return None
    means = [statistics.mean(col[i] for col in columns) for i in range(len(CEILING_GRID))]
    return CEILING_GRID[min(range(len(means)), key=means.__getitem__)]


def fit_ceilings(table: ErrorTable, indices: Iterable[int]) -> Ceilings:
    """Fit the ceilings on the prepared rows at `indices` (generation-wise, pooled where a generation is thin)."""
    chosen = list(indices)
    generation = {i: table.prepared[i].setup.cluster.efficiency.generation for i in chosen}
    high = [i for i in chosen if i in table.bf16_errors]
    pooled_bf16 = _argmin_mean([table.bf16_errors[i] for i in high])
    bf16: dict[str, float] = {}
    for gen in set(generation.values()):
        rows = [table.bf16_errors[i] for i in high if generation[i] == gen]
        fitted = _argmin_mean(rows) if len(rows) >= MIN_ROWS_PER_GENERATION else None
        value = fitted or pooled_bf16
        if value is not None:
            bf16[gen] = value
    low_rows = [i for i in chosen if i not in table.bf16_errors]

    def ceiling_of(i: int) -> float:
        prior = table.prepared[i].setup.cluster.efficiency.gemm_efficiency_max
        return bf16.get(generation[i], pooled_bf16 or prior)

    pooled_low = _argmin_mean([table.low_errors(i, ceiling_of(i)) for i in low_rows])
    low: dict[str, float] = {}
    for gen in set(generation.values()):
        rows = [table.low_errors(i, ceiling_of(i)) for i in low_rows if generation[i] == gen]
        fitted = _argmin_mean(rows) if len(rows) >= MIN_ROWS_PER_GENERATION else None
        value = fitted or pooled_low
        if value is not None:
            low[gen] = value
    return Ceilings(bf16, low)


@dataclass(frozen=True)
class FitReport:
    """In-sample predictions (fit on all rows), leave-one-source-out predictions, and the all-row fit."""

    in_sample: list[ValidationRow]
    out_of_sample: list[ValidationRow]
    ceilings: Ceilings


def fit_and_hold_out(prepared: list[PreparedRow]) -> FitReport:
    """Fit on all rows (in-sample), and for every source fit on the others and predict it (out of sample)."""
    table = ErrorTable(prepared)
    everything = range(len(prepared))
    # A generation no row of a fold shows keeps its catalog prior, as `calibrated` predicts unseen hardware.
    full = fit_ceilings(table, everything)
    in_sample = [predict_prepared(item, full.profile(item.setup.cluster.efficiency)) for item in prepared]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(prepared):
        groups.setdefault(source_group(item.setup.row.get("source", "")), []).append(i)
    held_out: dict[int, ValidationRow] = {}
    for members in groups.values():
        others = [i for i in everything if i not in set(members)]
        fit = fit_ceilings(table, others)
        for i in members:
            item = prepared[i]
            held_out[i] = predict_prepared(item, fit.profile(item.setup.cluster.efficiency))
    return FitReport(in_sample, [held_out[i] for i in everything], full)
