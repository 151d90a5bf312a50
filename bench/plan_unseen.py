"""The serving planner on published cells outside its validation table: TensorRT-LLM's whole perf-overview.

`aiinfra plan validate` scores the planner on the inference rows of its own table (24 run). The same source, the
TensorRT-LLM performance overview (docs/source/performance/perf-overview.md at commit 00f37686), publishes 210
throughput cells for seven models on H100, H200, B200 and GB200 over ten input/output lengths; the table holds 16 of
them. This check predicts all 210 with the packaged planner, nothing fitted to them (the only fitted values are the
training rows' GEMM ceilings), and reports the error per model and generation, dense and mixture-of-experts apart,
against the validation table's own figure in the same run (the ratio says how much worse the planner does on cells
it was not developed against).

    python bench/plan_unseen.py [--cells bench/data/trtllm_perf_overview_cells.csv]
    python bench/plan_unseen.py --cells bench/data/azure_mi300x_vllm_cells.csv   # 18 vLLM cells on MI300X (Azure)

Ends with one line of JSON: unseen_inference_mape, unseen_inference_max_ape, unseen_rows, unseen_rows_not_run,
unseen_dense_mape, unseen_moe_mape, table_inference_mape, unseen_over_table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aiinfra.plan.serve_rows import INFERENCE_RUNS_CSV, serve_models, validate_inference

CELLS = Path(__file__).with_name("data") / "trtllm_perf_overview_cells.csv"


def _mape(errors: list[float]) -> float:
    return sum(abs(e) for e in errors) / len(errors) if errors else float("nan")


def _share(errors: list[float]) -> str:
    return f"{_mape(errors):.1%} over {len(errors)} cells" if errors else "no cells"


def _rounded(errors: list[float]) -> float | None:
    """The MAPE to 4 places, or None (JSON null) for a group with no cells."""
    return round(_mape(errors), 4) if errors else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, default=CELLS, help="inference-runs CSV of cells to predict")
    args = parser.parse_args()
    models = serve_models()
    rows, not_run = validate_inference(args.cells)
    table_rows, _ = validate_inference(INFERENCE_RUNS_CSV)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    dense, moe = [], []
    for row in rows:
        groups[(row.model, row.generation)].append(row.error)
        (moe if models[row.model].spec.is_moe else dense).append(row.error)
    console = Console()
    table = Table(title=f"{args.cells.name}: predicted against published (no value fitted to these cells)")
    for column in ("model", "generation", "cells", "MAPE", "mean error", "max |error|"):
        table.add_column(column, justify="left" if column in ("model", "generation") else "right")
    for (name, generation), errors in sorted(groups.items()):
        table.add_row(name, generation, str(len(errors)), f"{_mape(errors):.1%}",
                      f"{sum(errors) / len(errors):+.1%}", f"{max(abs(e) for e in errors):.1%}")
    console.print(table)
    for run_id, reason in not_run:
        console.print(f"not run: {run_id}: {reason}")
    errors = [row.error for row in rows]
    table_mape = _mape([row.error for row in table_rows])
    unseen = _mape(errors)
    console.print(f"dense {_share(dense)}, mixture-of-experts {_share(moe)}; the validation table's inference rows "
                  f"{table_mape:.1%}: ratio {unseen / table_mape:.2f}")
    print(json.dumps({
        "unseen_inference_mape": round(unseen, 4),
        "unseen_inference_max_ape": round(max(abs(e) for e in errors), 4),
        "unseen_rows": len(rows),
        "unseen_rows_not_run": len(not_run),
        "unseen_dense_mape": _rounded(dense),
        "unseen_moe_mape": _rounded(moe),
        "table_inference_mape": round(table_mape, 4),
        "unseen_over_table": round(unseen / table_mape, 2),
    }))


if __name__ == "__main__":
    main()
