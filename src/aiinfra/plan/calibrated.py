"""The efficiencies the planner predicts with: the catalog's priors, with the GEMM ceilings fitted on the packaged
published runs (`fitting.fit_ceilings`) for every generation that has rows; other generations keep their priors."""

from __future__ import annotations

from functools import cache

from aiinfra.plan.cluster import Cluster, with_efficiency
from aiinfra.plan.fitting import Ceilings, ErrorTable, fit_ceilings


@cache
def fitted_ceilings() -> Ceilings:
    """GEMM ceilings fitted once on every packaged training row (computed on first use, about a second)."""
    from aiinfra.plan.validation import prepare_training

    prepared, _ = prepare_training()
    return fit_ceilings(ErrorTable(prepared), range(len(prepared)))


def calibrated(cluster: Cluster) -> Cluster:
    """The cluster with its generation's fitted GEMM ceilings (unchanged for a generation without rows)."""
    ceilings = fitted_ceilings()
    if cluster.efficiency.generation not in ceilings.bf16:
        return cluster
    return with_efficiency(cluster, ceilings.profile(cluster.efficiency))
