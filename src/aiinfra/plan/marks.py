"""Which hardware generations the planner has been validated on, and on how many published rows."""

from __future__ import annotations

from functools import cache

from aiinfra.hardware import get_accelerator
from aiinfra.plan.efficiency import generation_of


@cache
def validated_rows() -> dict[str, int]:
    """Published rows (training and inference) the packaged tables let the planner predict, per generation."""
    from aiinfra.plan.inference import validate_inference
    from aiinfra.plan.validation import prepare_training

    counts: dict[str, int] = {}
    prepared, _ = prepare_training()
    for item in prepared:
        generation = item.setup.cluster.efficiency.generation
        counts[generation] = counts.get(generation, 0) + 1
    for row in validate_inference()[0]:
        counts[row.generation] = counts.get(row.generation, 0) + 1
    return counts


def generation_mark(hardware: str) -> str:
    """'hopper: validated on 31 published rows' or 'cdna3: UNVALIDATED (no published row predicted)'."""
    accelerator = get_accelerator(hardware)
    generation = generation_of(accelerator.id, accelerator.kind)
    rows = validated_rows().get(generation, 0)
    if rows:
        return f"{generation}: validated on {rows} published rows"
    return f"{generation}: UNVALIDATED (no published row of this generation is predicted; treat as an estimate)"
