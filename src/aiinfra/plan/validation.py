"""Predict every row of a published-runs CSV of the shared schema and report the error per row.

Rows become runs through `runs.setup_from_row` (every column honoured; behaviour from the `framework` column, never
from `source` or `id`). A row the planner cannot represent, or whose layout does not fit in memory, is reported with
one line why and counted as not run. Knobs a row leaves empty are searched (fastest that fits), with one headroom
rule shared with `plan train --search` (`Cluster.usable_memory_bytes`).
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from aiinfra.plan.cells import CSV_ENCODING, published_value, run_row
from aiinfra.plan.cluster import Cluster, with_efficiency
from aiinfra.plan.efficiency import EfficiencyProfile
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import memory_breakdown
from aiinfra.plan.runs import (
    DoesNotFit,
    RowNotRepresentable,
    RunSetup,
    bf16_weights,
    chunk_choices,
    micro_batch_choices,
    predicted_metric,
    setup_from_row,
    stage_layers_of,
)
from aiinfra.plan.step import StepBreakdown, step_breakdown
from aiinfra.spec import ModelSpec

TRAINING_RUNS_CSV = Path(__file__).with_name("published_training_runs.csv")


def source_group(source: str) -> str:
    """The publisher a row's source names (its first word: a paper's first author, a repository, a site).

    Used only to hold sources out together in the out-of-sample check, never to choose behaviour.
    """
    first = source.strip().split()[0] if source.strip() else "?"
    return first.rstrip(",;:").split("/")[0] if "/" in first and "." in first.split("/")[0] else first.rstrip(",;:")


def _candidates(setup: RunSetup) -> list[Layout]:
    layout = setup.layout
    micro = micro_batch_choices(setup.settings.global_batch_seqs // layout.dp) if setup.search_micro_batch \
        else [layout.micro_batch]
    chunks = chunk_choices(stage_layers_of(setup.spec, layout.pp)) if setup.search_virtual_stages \
        else [layout.virtual_stages]
    recomputes: list[tuple[str, float]] = [(layout.recompute, 1.0)]
    if setup.search_recompute:
        # Unstated recomputation: none, selective, or full, and where the framework can recompute part of a stage
        # (Megatron's --recompute-num-layers), full on a quarter, half or three quarters of the layers.
        shares = (0.25, 0.5, 0.75, 1.0) if setup.facts.partial_recompute else (1.0,)
        recomputes = [("none", 1.0), ("selective", 1.0)] + [("full", f) for f in shares]
    # A framework whose selective policies can keep the saved activations in host memory (MaxText) may have run
    # them so: the searched variant pays the host transfers and keeps only layer inputs on the device.
    offloads = (False, True) if setup.facts.activation_offload else (False,)
    candidates = [replace(layout, micro_batch=b, virtual_stages=v, recompute=r, recompute_fraction=f,  # type: ignore[arg-type]
                          offload_activations=o)
                  for b, v, (r, f), o in itertools.product(micro, chunks, recomputes, offloads)
                  if not (o and r != "selective")]
    # A framework that can keep whole layers in host memory (Megatron's CPU offloading) may have run some instead of
    # recomputing them, where the catalog knows the device's host link.
    if setup.search_recompute and setup.facts.layer_offload and setup.cluster.accelerator.host_bw_gbs:
        candidates += [replace(layout, micro_batch=b, virtual_stages=v, recompute="none", recompute_fraction=1.0,
                               offload_layer_fraction=share)
                       for b, v, share in itertools.product(micro, chunks, (0.25, 0.5, 0.75, 1.0))]
    return candidates


def fitted_setup(setup: RunSetup) -> tuple[RunSetup, Layout]:
    """The setup and the fastest layout that fits; where nothing fits with the framework's default fp32 weights and
    the row states no weight dtype, the framework's bf16-weights switch if it has one
    (`FrameworkFacts.bf16_weights_when_needed`); where nothing fits with the framework's default sharding and the row
    states none, the run sharded everything (ZeRO-3 / FSDP over its data-parallel ranks: it ran, so it fit);
    RowNotRepresentable when nothing fits."""
    try:
        return setup, best_layout(setup)[0]
    except DoesNotFit:
        unsharded = not (setup.row.get("sharding") or "").strip() and setup.layout.zero_stage < 3 \
            and setup.layout.dp > 1
        stated = (setup.row.get("weight_dtype") or "").strip()
        if unsharded:
            layout = setup.layout
            sharded = replace(setup, layout=replace(layout, dp_replicate=1, dp_shard=layout.dp, zero_stage=3))
            return fitted_setup(sharded)
        if not setup.facts.bf16_weights_when_needed or stated or setup.settings.param_bytes == 2:
            raise
    bf16 = replace(setup, settings=bf16_weights(setup.settings))
    return bf16, best_layout(bf16)[0]


def best_layout(setup: RunSetup) -> tuple[Layout, StepBreakdown]:
    """The fastest layout among the unstated knobs that fits; RowNotRepresentable when none does."""
    best: tuple[Layout, StepBreakdown] | None = None
    smallest = float("inf")
    for layout in _candidates(setup):
        try:
            need = memory_breakdown(setup.spec, setup.settings, layout).total_bytes
            if need > setup.cluster.usable_memory_bytes:
                smallest = min(smallest, need)
                continue
            step = step_breakdown(setup.spec, setup.settings, layout, setup.cluster)
        except PlanError as error:
            raise RowNotRepresentable(str(error)) from None
        if best is None or step.step_time_s < best[1].step_time_s:
            best = (layout, step)
    if best is None:
        usable_gib = setup.cluster.usable_memory_bytes / 2**30
        raise DoesNotFit(f"does not fit: {smallest / 2**30:.1f} GiB per device needed, {usable_gib:.1f} GiB "
                                  f"usable of {setup.cluster.memory_bytes / 2**30:.0f} GiB")
    return best


@dataclass(frozen=True)
class ValidationRow:
    """One published run, predicted."""

    run_id: str
    source: str
    generation: str
    precision: str
    metric: str
    published: float
    predicted: float
    layout: str
    step_time_s: float

    @property
    def error(self) -> float:
        """Signed relative error (predicted - published) / published."""
        return (self.predicted - self.published) / self.published


@dataclass(frozen=True)
class NotRun:
    """A row the planner could not predict, and why."""

    run_id: str
    source: str
    reason: str


@dataclass(frozen=True)
class PreparedRow:
    """A row with its chosen layout, ready to be re-predicted under other efficiency values."""

    setup: RunSetup
    layout: Layout


def load_training_runs(path: Path = TRAINING_RUNS_CSV) -> list[dict[str, str]]:
    """The rows of a training-runs CSV of the shared schema."""
    with open(path, newline="", encoding=CSV_ENCODING) as handle:
        return [run_row(row) for row in csv.DictReader(handle)]


def prepare_training(path: Path = TRAINING_RUNS_CSV) -> tuple[list[PreparedRow], list[NotRun]]:
    """Translate every row and choose its unstated knobs with the catalog's efficiencies."""
    prepared, not_run = [], []
    for row in load_training_runs(path):
        run_id, source = row.get("id", "?"), row.get("source", "")
        try:
            setup, layout = fitted_setup(setup_from_row(row))
        except PlanError as error:
            not_run.append(NotRun(run_id, source, str(error.args[0] if error.args else error)))
            continue
        prepared.append(PreparedRow(setup, layout))
    return prepared, not_run


def predict_prepared(item: PreparedRow, profile: EfficiencyProfile | None = None) -> ValidationRow:
    """Predict one prepared row, under another efficiency profile of its generation if given."""
    setup = item.setup
    cluster: Cluster = setup.cluster if profile is None else with_efficiency(setup.cluster, profile)
    step = step_breakdown(setup.spec, setup.settings, item.layout, cluster)
    setup_used = setup if profile is None else replace(setup, cluster=cluster)
    return ValidationRow(setup.row.get("id", "?"), setup.row.get("source", ""), setup.cluster.efficiency.generation,
                         setup.settings.precision, setup.row.get("metric", ""), published_value(setup.row),
                         predicted_metric(setup_used, step), item.layout.describe(), step.step_time_s)


def validate_training(path: Path = TRAINING_RUNS_CSV) -> tuple[list[ValidationRow], list[NotRun]]:
    """Predict every row with the catalog's efficiencies (no fitting): rows run, and rows not run."""
    prepared, not_run = prepare_training(path)
    return [predict_prepared(item) for item in prepared], not_run


@dataclass(frozen=True)
class MemoryCheckRow:
    """Our tensor-by-tensor activation count against Korthikanti et al.'s closed form, and parameters."""

    model: str
    case: str  # "no recompute (TP)" or "SP + selective"
    predicted_bytes: float
    reference_bytes: float
    params: float
    reference_params: float

    @property
    def error(self) -> float:
        return (self.predicted_bytes - self.reference_bytes) / self.reference_bytes

    @property
    def params_error(self) -> float:
        return (self.params - self.reference_params) / self.reference_params


# Korthikanti et al. 2022, Table 3: (name, hidden, heads, layers, tensor parallel, micro-batch); GPT, s = 2048.
KORTHIKANTI_MODELS = [("22b", 6144, 64, 48, 8, 4), ("175b", 12288, 96, 96, 8, 1), ("530b", 20480, 128, 105, 8, 1),
                      ("1t", 25600, 160, 128, 8, 1)]


def memory_check() -> list[MemoryCheckRow]:
    """Activation memory of the first pipeline stage for Korthikanti's 22B, 175B, 530B and 1T models.

    Reference: their Table 2 closed forms times L layers in flight (section 4.3): s b h L (10 + 24/t + 5 a s /(h t))
    without recomputation (tensor parallelism only) and 34 s b h L / t with sequence parallelism plus selective
    recomputation. Ours adds the embedding-dropout and output-layer terms they show are small. Their runs used
    materialized attention with dropout, which is what the closed forms count.
    """
    results = []
    s = 2048
    for name, h, a, layers, t, b in KORTHIKANTI_MODELS:
        spec = ModelSpec(vocab_size=51200, dim=h, n_layers=layers, n_heads=a, n_kv_heads=a, ffn_dim=4 * h,
                         max_seq_len=s, mlp="gelu", norm="layernorm", position="learned", bias=True,
                         tie_embeddings=True)
        settings = TrainSettings(seq_len=s, global_batch_seqs=b, attention_kernel="materialized", dropout=True)
        cases = [
            ("no recompute (TP)", Layout(tp=t, micro_batch=b),
             s * b * h * layers * (10 + 24 / t + 5 * a * s / (h * t))),
            ("SP + selective", Layout(tp=t, micro_batch=b, recompute="selective", sequence_parallel=True),
             s * b * h * layers * 34 / t),
        ]
        for case, layout, reference in cases:
            predicted = memory_breakdown(spec, settings, layout).activations_bytes
            results.append(MemoryCheckRow(name, case, predicted, reference, spec.num_params(),
                                          float(name.rstrip("bt")) * (1e12 if name.endswith("t") else 1e9)))
    return results
