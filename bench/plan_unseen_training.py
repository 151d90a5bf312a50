"""The training planner on published cells outside its validation table: Megatron-Bridge's archived performance tables.

`aiinfra plan validate` leads with leave-one-source-out error: each source predicted by ceilings fitted on all the
others. Megatron-Bridge is one of those sources (12 rows in the table, from its 25.09 to 26.06 containers). Its
performance-summary archive (docs/performance-summary-archive.md at commit 4da7335f) publishes 80 pre-training cells
for its 25.09, 25.11 and 26.02 containers: Llama 3 8B/70B/405B, DeepSeek-V3, GPT-OSS 120B, Qwen3 30B-A3B and 235B-A22B
on H100, B200, GB200, B300 and GB300, in BF16, FP8, MXFP8 and NVFP4, under TP/PP/CP/VP/EP and Megatron-FSDP.
This check predicts every cell with GEMM ceilings fitted on the table's rows of every OTHER source (the same fit the
table's held-out Megatron-Bridge rows get), nothing fitted to the cells, and reports the error per model and
generation, dense and mixture-of-experts apart, beside the held-out error of the table's own Megatron-Bridge rows in
the same run (the ratio says how much worse the planner does on cells it was not developed against).

The cells are transcribed in bench/data/bridge_performance_cells.csv in the shared schema. Where a cell gives a
second figure in parentheses for another quantization granularity only, the first is kept; where the parentheses give
another configuration (25.09 GB200 Llama 3 70B and 405B, DeepSeek-V3) that is a cell of its own. DeepSeek-V3 with MTP
(25.11 B200) is left out: the schema has no multi-token-prediction column. An expert parallelism larger than
data x context parallelism is taken as Megatron's MoE Parallel Folding over TP (`Layout.expert_tp`); a cell whose EP
does not divide tp x dp x cp prints as not run.

    python bench/plan_unseen_training.py [--cells bench/data/bridge_performance_cells.csv]

Ends with one line of JSON: unseen_training_mape, unseen_training_max_ape, unseen_training_rows,
unseen_training_rows_not_run, unseen_training_dense_mape, unseen_training_moe_mape, cells_in_table,
table_source_mape, unseen_over_table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aiinfra.plan.fitting import ErrorTable, fit_ceilings
from aiinfra.plan.validation import PreparedRow, ValidationRow, predict_prepared, prepare_training, source_group

CELLS = Path(__file__).with_name("data") / "bridge_performance_cells.csv"
MATCH_COLUMNS = ("hardware", "n_devices", "tp", "pp", "cp", "ep", "micro_batch", "global_batch_seqs", "precision",
                 "value")


def _mape(errors: list[float]) -> float:
    return sum(abs(e) for e in errors) / len(errors) if errors else float("nan")


def _key(item: PreparedRow) -> tuple[str, ...]:
    row = item.setup.row
    return tuple((row.get(column) or "").strip() for column in MATCH_COLUMNS) + (str(item.setup.spec.n_layers),)


def predict_held_out(cells: list[PreparedRow], table: list[PreparedRow]) -> tuple[list[ValidationRow],
                                                                                   list[ValidationRow]]:
    """Fit the ceilings on the table rows of every source but the cells' own and predict both the cells and that
    source's table rows with the fit (the table's held-out prediction of that source)."""
    groups = {source_group(item.setup.row.get("source", "")) for item in cells}
    others = [item for item in table if source_group(item.setup.row.get("source", "")) not in groups]
    own = [item for item in table if source_group(item.setup.row.get("source", "")) in groups]
    fit = fit_ceilings(ErrorTable(others), range(len(others)))

    def predict(items: list[PreparedRow]) -> list[ValidationRow]:
        return [predict_prepared(item, fit.profile(item.setup.cluster.efficiency)) for item in items]

    return predict(cells), predict(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, default=CELLS, help="training-runs CSV of cells to predict")
    args = parser.parse_args()
    cells, not_run = prepare_training(args.cells)
    table, _ = prepare_training()
    in_table = {_key(item) for item in table}
    predicted, own = predict_held_out(cells, table)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    dense, moe, seen = [], [], 0
    for item, row in zip(cells, predicted, strict=True):
        spec = item.setup.spec
        groups[(item.setup.row["model"] + f" {spec.n_layers}L", row.generation)].append(row.error)
        (moe if spec.is_moe else dense).append(row.error)
        seen += _key(item) in in_table
    console = Console()
    table_view = Table(title=f"{args.cells.name}: predicted against published (ceilings fitted on the other sources)")
    for column in ("model", "generation", "cells", "MAPE", "mean error", "max |error|"):
        table_view.add_column(column, justify="left" if column in ("model", "generation") else "right")
    for (name, generation), errors in sorted(groups.items()):
        table_view.add_row(name, generation, str(len(errors)), f"{_mape(errors):.1%}",
                           f"{sum(errors) / len(errors):+.1%}", f"{max(abs(e) for e in errors):.1%}")
    console.print(table_view)
    for row in sorted(predicted, key=lambda r: -abs(r.error))[:10]:
        console.print(f"worst: {row.run_id}: {row.error:+.1%} ({row.layout})")
    for item in not_run:
        console.print(f"not run: {item.run_id}: {item.reason}")
    errors = [row.error for row in predicted]
    table_mape = _mape([row.error for row in own])
    unseen = _mape(errors)
    console.print(f"dense {_mape(dense):.1%} over {len(dense)} cells, mixture-of-experts {_mape(moe):.1%} over "
                  f"{len(moe)} ({seen} of the cells are also in the table); the table's held-out rows of this "
                  f"source {table_mape:.1%} over {len(own)}: ratio {unseen / table_mape:.2f}")
    print(json.dumps({
        "unseen_training_mape": round(unseen, 4),
        "unseen_training_max_ape": round(max(abs(e) for e in errors), 4),
        "unseen_training_rows": len(predicted),
        "unseen_training_rows_not_run": len(not_run),
        "unseen_training_dense_mape": round(_mape(dense), 4),
        "unseen_training_moe_mape": round(_mape(moe), 4),
        "cells_in_table": seen,
        "table_source_mape": round(table_mape, 4),
        "unseen_over_table": round(unseen / table_mape, 2),
    }))


if __name__ == "__main__":
    main()
