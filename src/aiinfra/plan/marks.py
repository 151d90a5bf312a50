"""Which hardware generations the planner has been validated on, and on how many published rows."""

from __future__ import annotations

from functools import cache

from aiinfra.hardware import get_accelerator
from aiinfra.plan.efficiency import generation_of


@cache
def validated_rows() -> dict[str, tuple[int, int]]:
    """Published (training, inference) rows of the packaged tables that the planner predicts, per generation."""
    from aiinfra.plan.serve_rows import validate_inference
    from aiinfra.plan.validation import prepare_training

    training: dict[str, int] = {}
    inference: dict[str, int] = {}
    for item in prepare_training()[0]:
        generation = item.setup.cluster.efficiency.generation
        training[generation] = training.get(generation, 0) + 1
    for row in validate_inference()[0]:
        inference[row.generation] = inference.get(row.generation, 0) + 1
    return {g: (training.get(g, 0), inference.get(g, 0)) for g in set(training) | set(inference)}


def generation_mark(hardware: str) -> str:
    """For example 'hopper: validated on 26 training and 12 inference rows', or UNVALIDATED where none."""
    accelerator = get_accelerator(hardware)
    generation = generation_of(accelerator.id, accelerator.kind)
    training, inference = validated_rows().get(generation, (0, 0))
    if not training and not inference:
        return f"{generation}: UNVALIDATED (no published row of this generation is predicted; treat as an estimate)"
    parts = [f"{generation}: training " + (f"validated on {training} published rows" if training
                                            else "UNVALIDATED (no published training row)")]
    parts.append(f"inference validated on {inference} rows" if inference else "inference UNVALIDATED")
    return "; ".join(parts)
