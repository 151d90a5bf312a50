"""The accuracy targets of issue 6, measured on the published runs copied into the package."""

import statistics

from aiinfra.plan.inference import validate_inference
from aiinfra.plan.validation import memory_check, validate_training


def test_training_runs_mape_at_most_10_percent_and_max_at_most_25() -> None:
    rows = validate_training()
    errors = [abs(r.error) for r in rows]
    assert len(rows) == 31
    assert statistics.mean(errors) <= 0.10
    assert max(errors) <= 0.25


def test_activation_memory_within_10_percent_of_korthikanti() -> None:
    rows = memory_check()
    assert {r.model for r in rows} == {"22b", "175b", "530b", "1t"}
    assert all(abs(r.error) <= 0.10 and abs(r.params_error) <= 0.10 for r in rows)


def test_tensorrt_llm_throughput_within_25_percent_per_row() -> None:
    rows = [r for r in validate_inference() if r.headline]
    assert len(rows) == 8
    assert all(abs(r.error) <= 0.25 for r in rows), [(r.run_id, round(r.error, 3)) for r in rows]
