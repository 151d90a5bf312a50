"""`aiinfra plan validate`: predict every row of training and inference CSVs, out of sample first.

The headline is leave-one-source-out (each source predicted by a fit on all the others, `fitting.py`); the
in-sample figure (one fit on every row) is printed beside it. Rows not run are listed with their reason and counted.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aiinfra.plan.efficiency import efficiency_table
from aiinfra.plan.fitting import LOW_PRECISION, MIN_ROWS_PER_GENERATION, FitReport, fit_and_hold_out
from aiinfra.plan.serve_rows import INFERENCE_RUNS_CSV, InferenceValidationRow, validate_inference
from aiinfra.plan.validation import TRAINING_RUNS_CSV, ValidationRow, memory_check, prepare_training, source_group


def error_summary(errors: list[float]) -> tuple[float, float]:
    """Mean and max absolute relative error (0, 0 for no rows)."""
    absolute = [abs(e) for e in errors]
    return (statistics.mean(absolute), max(absolute)) if absolute else (0.0, 0.0)


def _training_table(report: FitReport) -> Table:
    table = Table(title="published training runs: leave-one-source-out prediction (headline), in-sample beside it")
    for name in ("run", "hardware gen", "metric", "published", "predicted (held out)", "error (held out)",
                 "error (in-sample)", "layout (unstated knobs searched)"):
        table.add_column(name, justify="right" if "error" in name or name.startswith(("pub", "pred")) else "left")
    for held, fitted in zip(report.out_of_sample, report.in_sample, strict=True):
        table.add_row(held.run_id, held.generation, held.metric, f"{held.published:g}", f"{held.predicted:.4g}",
                      f"{100 * held.error:+.1f}%", f"{100 * fitted.error:+.1f}%", held.layout)
    return table


def _inference_table(rows: list[InferenceValidationRow]) -> Table:
    table = Table(title="published inference runs: predicted (no value fitted to them) vs published")
    for name in ("run", "hardware gen", "metric", "published", "predicted", "error", "batch (bound)"):
        table.add_column(name, justify="left" if name in ("run", "hardware gen", "metric") else "right")
    for s in rows:
        predicted = f"{s.predicted:,.4g}" if s.predicted < 1000 else f"{s.predicted:,.0f}"
        table.add_row(s.run_id, s.generation, s.metric, f"{s.published:,g}", predicted, f"{100 * s.error:+.1f}%",
                      f"{s.batch} ({s.limited_by})")
    return table


def _ceiling_table(report: FitReport) -> Table:
    table = Table(title="GEMM ceilings fitted on all rows (share of the dense peak), per generation")
    for name in ("generation", "bf16 ceiling", "fp8/fp4 ceiling", "training rows", "status"):
        table.add_column(name)
    counts: dict[str, list[int]] = {}
    for r in report.in_sample:
        counts.setdefault(r.generation, [0, 0])[1 if r.precision in LOW_PRECISION else 0] += 1

    def basis(rows: int) -> str:
        if rows >= MIN_ROWS_PER_GENERATION:
            return "own rows"
        return "pooled: too few rows" if rows else "pooled: no rows"

    for generation, profile in efficiency_table().items():
        high, low = counts.get(generation, [0, 0])
        if high + low == 0:
            table.add_row(generation, f"{profile.gemm_efficiency_max:.2f} (prior)",
                          f"{profile.fp8_gemm_efficiency_max or 0:.2f} (prior)", "0", "UNVALIDATED (prior values)")
            continue
        bf16 = report.ceilings.bf16.get(generation, profile.gemm_efficiency_max)
        low_ceiling = report.ceilings.low.get(generation, profile.fp8_gemm_efficiency_max or 0)
        table.add_row(generation, f"{bf16:.2f} ({basis(high)})", f"{low_ceiling:.2f} ({basis(low)})",
                      f"{high} + {low} low-precision", "validated")
    return table


def errors_by_source(rows: list[ValidationRow]) -> list[tuple[str, int, float, float]]:
    """(publisher, rows, MAPE, max) of the held-out predictions, worst MAPE first (each source was held out whole)."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(source_group(row.source), []).append(row.error)
    summary = [(name, len(errors), *error_summary(errors)) for name, errors in groups.items()]
    return sorted(summary, key=lambda item: -item[2])


def _source_table(report: FitReport) -> Table:
    table = Table(title="leave-one-source-out error per source (the source held out, the fit on all others)")
    for name in ("source", "rows", "MAPE", "max"):
        table.add_column(name, justify="left" if name == "source" else "right")
    for name, count, mape, worst in errors_by_source(report.out_of_sample):
        table.add_row(name, str(count), f"{100 * mape:.1f}%", f"{100 * worst:.1f}%")
    return table


def _memory_table() -> Table:
    table = Table(title="activation memory, first stage, vs Korthikanti et al. 2022 (Table 2 x L)")
    for name in ("model", "case", "ours", "Korthikanti", "error"):
        table.add_column(name, justify="left" if name in ("model", "case") else "right")
    for m in memory_check():
        table.add_row(m.model, m.case, f"{m.predicted_bytes / 1e9:.1f} GB", f"{m.reference_bytes / 1e9:.1f} GB",
                      f"{100 * m.error:+.1f}%")
    return table


def markdown_rows(report: FitReport, serving: list[InferenceValidationRow], not_run: list[str]) -> str:
    """The per-row tables as Markdown (for docs/planner.md): held-out and in-sample errors, then inference, not run."""
    lines = ["| run | gen | metric | published | predicted (held out) | error held out | error in-sample | layout |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for held, fitted in zip(report.out_of_sample, report.in_sample, strict=True):
        lines.append(f"| {held.run_id} | {held.generation} | {held.metric} | {held.published:g} | "
                     f"{held.predicted:.4g} | {100 * held.error:+.1f}% | {100 * fitted.error:+.1f}% | {held.layout} |")
    lines += ["", "| source (held out) | rows | MAPE | max |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {count} | {100 * mape:.1f}% | {100 * worst:.1f}% |"
              for name, count, mape, worst in errors_by_source(report.out_of_sample)]
    lines += ["", "| inference run | gen | metric | published | predicted | error | batch (bound) |",
              "|---|---|---|---:|---:|---:|---|"]
    for s in serving:
        lines.append(f"| {s.run_id} | {s.generation} | {s.metric} | {s.published:g} | {s.predicted:.4g} | "
                     f"{100 * s.error:+.1f}% | {s.batch} ({s.limited_by}) |")
    lines += ["", "Not run:", ""] + [f"- {line}" for line in not_run]
    return "\n".join(lines)


def _print_console_report(console: Console, report: FitReport, serving: list[InferenceValidationRow],
                          reasons: list[str], rows: int, held: tuple[float, float], in_sample: tuple[float, float],
                          inference: tuple[float, float], together: tuple[float, float]) -> None:
    """The report for a terminal: the headline sentence, the rows not run, and the rich tables."""
    console.print(
        f"[bold]leave-one-source-out[/] (each source predicted by a fit on all others): training MAPE "
        f"{100 * held[0]:.1f}%, max {100 * held[1]:.1f}% over {rows} rows; training and inference "
        f"together MAPE {100 * together[0]:.1f}%, max {100 * together[1]:.1f}%. In-sample (one fit on every row): "
        f"MAPE {100 * in_sample[0]:.1f}%, max {100 * in_sample[1]:.1f}%. Inference (no value fitted to its rows): "
        f"MAPE {100 * inference[0]:.1f}%, max {100 * inference[1]:.1f}% over {len(serving)} rows."
    )
    for line in reasons:
        console.print(f"not run: {line}", markup=False)
    console.print(_ceiling_table(report))
    console.print(_source_table(report))
    console.print(_training_table(report))
    console.print(_inference_table(serving))
    console.print(_memory_table())


def run_validation(console: Console, runs: Path = TRAINING_RUNS_CSV, inference: Path = INFERENCE_RUNS_CSV,
                   markdown: bool = False) -> dict[str, Any]:
    """Print the validation report (or, with `markdown`, its per-row tables) and return the headline figures."""
    prepared, not_run = prepare_training(runs)
    report = fit_and_hold_out(prepared)
    serving, serving_not_run = validate_inference(inference)
    held_mape, held_max = error_summary([r.error for r in report.out_of_sample])
    in_mape, in_max = error_summary([r.error for r in report.in_sample])
    inf_mape, inf_max = error_summary([s.error for s in serving])
    all_mape, all_max = error_summary([r.error for r in report.out_of_sample] + [s.error for s in serving])
    reasons = [f"{r.run_id}: {r.reason}" for r in not_run] + [f"{i}: {why}" for i, why in serving_not_run]
    if markdown:  # the tables alone, ready to paste; the command still ends with the JSON line
        print(markdown_rows(report, serving, reasons))
    else:
        _print_console_report(console, report, serving, reasons, len(prepared), (held_mape, held_max),
                              (in_mape, in_max), (inf_mape, inf_max), (all_mape, all_max))
    worst = max(report.out_of_sample, key=lambda r: abs(r.error), default=None)

    def figure(value: float, rows: int) -> float | None:  # no row run: no error to report (not a 0% that cannot fail)
        return round(value, 4) if rows else None

    trained, served = len(prepared), len(serving)
    return {
        "validate_mape": figure(held_mape, trained), "validate_max_ape": figure(held_max, trained),
        "rows": trained, "rows_not_run": len(not_run),
        "in_sample_mape": figure(in_mape, trained), "in_sample_max_ape": figure(in_max, trained),
        "worst_row": worst.run_id if worst else None,
        "inference_mape": figure(inf_mape, served), "inference_max_ape": figure(inf_max, served),
        "inference_rows": served, "inference_rows_not_run": len(serving_not_run),
        "all_rows_out_of_sample_mape": figure(all_mape, trained + served),
        "all_rows_out_of_sample_max_ape": figure(all_max, trained + served),
    }

