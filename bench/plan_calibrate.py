"""Fit each hardware generation's efficiency ceilings to the published runs of that generation, and cross-check.

Workload: every row of src/aiinfra/plan/published_training_runs.csv. For each generation it grid-searches the two
free parameters (the GEMM ceiling and the fused-attention efficiency; every other efficiency value stays as in
efficiency.csv) minimising the mean absolute percentage error over all of that generation's rows together: one
set per generation, never per row. It then repeats the fit leaving one source (paper) out at a time and reports
the error on the left-out rows, which is the honest out-of-sample figure. Baseline: the values in efficiency.csv.

Rerun: python bench/plan_calibrate.py
Ends with one JSON line of its headline figures.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from aiinfra.plan.efficiency import efficiency_table
from aiinfra.plan.validation import load_training_runs, setup_from_row, source_key, validate_training


def _grid(lo: float, hi: float, step: float) -> list[float]:
    count = int(round((hi - lo) / step))
    return [round(lo + i * step, 4) for i in range(count + 1)]


def fit(generation: str, ids: set[str]) -> tuple[float, float, float]:
    """Best (gemm ceiling, attention efficiency, MAPE) for one generation over the rows `ids`.

    The attention efficiency is fitted only when some of the rows use a fused (flash) attention kernel.
    """
    base = efficiency_table()[generation]
    best = (base.gemm_efficiency_max, base.attention_efficiency, float("inf"))
    flash = any(setup_from_row(r).settings.attention_kernel == "flash" for r in load_training_runs() if r["id"] in ids)
    for attention in _grid(0.15, 0.70, 0.05) if flash else [base.attention_efficiency]:
        for gemm in _grid(0.40, 0.95, 0.01):
            profile = replace(base, gemm_efficiency_max=gemm, attention_efficiency=attention)
            rows = validate_training(profiles={generation: profile}, only=ids)
            mape = statistics.mean(abs(r.error) for r in rows)
            if mape < best[2]:
                best = (gemm, attention, mape)
    return best


def main() -> None:
    runs = load_training_runs()
    by_generation: dict[str, list[dict[str, str]]] = {}
    for row in runs:
        by_generation.setdefault(setup_from_row(row).cluster.efficiency.generation, []).append(row)
    summary: dict[str, float] = {}
    for generation, rows in by_generation.items():
        sources = sorted({source_key(r["source"]) for r in rows})
        if len(sources) < 2:
            # One source cannot be split into fit and check; keep the a priori value and report its error.
            current = validate_training(only={r["id"] for r in rows})
            current_mape = statistics.mean(abs(r.error) for r in current)
            print(f"{generation}: only one source ({sources[0]}); not fitted, a priori values give "
                  f"MAPE={current_mape:.3f} over {len(rows)} rows")
            summary[f"{generation}_a_priori_mape"] = round(current_mape, 4)
            continue
        gemm, attention, mape = fit(generation, {r["id"] for r in rows})
        print(f"{generation}: fitted gemm_efficiency_max={gemm} attention_efficiency={attention} "
              f"in-sample MAPE={mape:.3f} over {len(rows)} rows")
        for source in sources:
            held = {r["id"] for r in rows if source_key(r["source"]) == source}
            train = {r["id"] for r in rows} - held
            g, a, _ = fit(generation, train)
            base = efficiency_table()[generation]
            profile = replace(base, gemm_efficiency_max=g, attention_efficiency=a)
            out = validate_training(profiles={generation: profile}, only=held)
            out_mape = statistics.mean(abs(r.error) for r in out)
            print(f"  leave out {source!r}: fit on the rest gives gemm={g} attention={a}, "
                  f"MAPE on the left-out {len(held)} rows={out_mape:.3f}")
            name = source.split()[0].split("/")[-1].lower()
            summary[f"{generation}_leave_out_{name}_mape"] = round(out_mape, 4)
        summary[f"{generation}_in_sample_mape"] = round(mape, 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
