"""The cluster planner: pure arithmetic over frozen dataclasses (never imports torch).

Predicts memory per device, step time, MFU/HFU, tokens/s, days, device-hours, energy, cost and failure-aware goodput
for a `ModelSpec` (the trainer's own spec) on a `Cluster` with a `Layout`; searches layouts; sizes inference
fleets; and validates itself against published runs (`validation`, `serve_rows.validate_inference`).
Modules: cluster (topology, collectives), efficiency (per-generation efficiencies), layout, memory, step,
training (runs and search), reliability, inference, validation, calibration (local CPU profile), plots, commands.
"""

from aiinfra.plan.cluster import Cluster, make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.training import TrainingPlan, plan_training, search_layout

__all__ = ["Cluster", "Layout", "PlanError", "TrainSettings", "TrainingPlan", "make_cluster", "plan_training",
           "search_layout"]
