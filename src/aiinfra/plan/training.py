"""A whole training run: step, memory, throughput, days, device-hours, energy, cost and goodput; layout search."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from aiinfra.plan.cluster import Cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings, layers_per_stage
from aiinfra.plan.memory import MemoryBreakdown, memory_breakdown
from aiinfra.plan.reliability import ReliabilityPlan, ReliabilitySettings, plan_reliability
from aiinfra.plan.step import StepBreakdown, step_breakdown
from aiinfra.spec import ModelSpec


@dataclass(frozen=True)
class CostSettings:
    """Power and price assumptions for energy and cost."""

    price_per_device_hour: float | None = None  # user-set; no cost is shown without it
    power_utilization: float = 1.0  # share of TDP drawn; 1.0 is the Llama 3 model card's convention (TDP)
    pue: float = 1.1  # data-centre power usage effectiveness (Google's published fleet average, 2023)


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the planner predicts for one model, cluster, layout and token budget."""

    spec: ModelSpec
    cluster: Cluster
    settings: TrainSettings
    layout: Layout
    step: StepBreakdown
    memory: MemoryBreakdown
    tokens: float
    reliability: ReliabilityPlan
    costs: CostSettings

    @property
    def fits(self) -> bool:
        return self.memory.total_bytes <= self.cluster.usable_memory_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.settings.tokens_per_step / self.step.step_time_s

    @property
    def mfu(self) -> float:
        return self.step.mfu(self.cluster, self.settings.precision)

    @property
    def hfu(self) -> float:
        return self.step.hfu(self.cluster, self.settings.precision)

    @property
    def ideal_days(self) -> float:
        """Days of failure-free training."""
        return self.tokens / self.tokens_per_s / 86400

    @property
    def wall_days(self) -> float:
        """Days including checkpoints, lost work and restarts (ideal days / goodput)."""
        return self.ideal_days / self.reliability.goodput if self.reliability.goodput > 0 else math.inf

    @property
    def device_hours(self) -> float:
        return self.wall_days * 24 * self.cluster.n_devices

    @property
    def energy_mwh(self) -> float | None:
        """Device power x utilisation x PUE over the wall-clock run; None when the catalog has no power figure."""
        tdp = self.cluster.accelerator.tdp_w
        if tdp is None:
            return None
        return self.device_hours * tdp * self.costs.power_utilization * self.costs.pue / 1e6

    @property
    def cost(self) -> float | None:
        if self.costs.price_per_device_hour is None:
            return None
        return self.device_hours * self.costs.price_per_device_hour


def plan_training(spec: ModelSpec, cluster: Cluster, settings: TrainSettings, layout: Layout, tokens: float,
                  costs: CostSettings | None = None,
                  reliability: ReliabilitySettings | None = None) -> TrainingPlan:
    """Predict a training run of `tokens` tokens with one layout."""
    step = step_breakdown(spec, settings, layout, cluster)
    ideal_s = tokens / (settings.tokens_per_step / step.step_time_s)
    return TrainingPlan(
        spec=spec, cluster=cluster, settings=settings, layout=layout, step=step,
        memory=memory_breakdown(spec, settings, layout), tokens=tokens,
        reliability=plan_reliability(cluster.n_devices, spec.num_params(), ideal_s, reliability),
        costs=costs or CostSettings(),
    )


# The largest expert-parallel degree the search tries: a 64-GPU group keeps DeepSeek-V3's 256 experts at 4 a
# device, the widest of the published runs (DeepSeek-V3 trained with EP64, arXiv 2412.19437 3.4.1).
MAX_SEARCHED_EP = 64


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    return [d for d in (2**i for i in range(0, 20)) if d <= limit and n % d == 0]


def candidate_layouts(spec: ModelSpec, settings: TrainSettings, cluster: Cluster) -> list[Layout]:
    """Every layout the search considers: TP within the scale-up domain, PP with its schedule, DP, ZeRO stage,
    micro-batch and recomputation (context parallelism for sequences of 32K tokens and more; for a
    mixture-of-experts model, expert parallelism over dp x cp up to MAX_SEARCHED_EP)."""
    n = cluster.n_devices
    layouts = []
    tps = [t for t in _powers_of_two_dividing(n, cluster.scaleup_domain) if spec.n_heads % t == 0]
    cps = _powers_of_two_dividing(n, 32) if settings.seq_len >= 32768 else [1]
    for tp, cp in itertools.product(tps, cps):
        if settings.seq_len % cp:
            continue
        rest = n // (tp * cp)
        for pp in [p for p in range(1, min(rest, spec.n_layers) + 1) if rest % p == 0]:
            dp = rest // pp
            if settings.global_batch_seqs % dp:
                continue
            per_replica = settings.global_batch_seqs // dp
            micro = [b for b in (1, 2, 4, 8) if per_replica % b == 0]
            stage_layers = layers_per_stage(spec, Layout(pp=pp))
            schedules: list[tuple[str, int]] = [("1f1b", 1)]
            if pp > 1:
                schedules += [("interleaved_1f1b", v) for v in (2, 4) if stage_layers % v == 0]
            zeros = [0, 1, 3] if pp == 1 else [0, 1]
            eps = [1]
            if spec.is_moe and spec.n_experts > 1:
                eps = _powers_of_two_dividing(dp * cp, min(MAX_SEARCHED_EP, spec.n_experts))
            for b, (schedule, v), zero, recompute, ep in itertools.product(
                micro, schedules, zeros, ("none", "selective", "full"), eps
            ):
                layouts.append(Layout(tp=tp, pp=pp, dp_replicate=1 if zero else dp, dp_shard=dp if zero else 1,
                                      cp=cp, ep=ep, virtual_stages=v, pp_schedule=schedule,  # type: ignore[arg-type]
                                      zero_stage=zero, micro_batch=b, recompute=recompute,  # type: ignore[arg-type]
                                      sequence_parallel=tp > 1))
    return layouts


def search_layout(spec: ModelSpec, cluster: Cluster, settings: TrainSettings, tokens: float,
                  costs: CostSettings | None = None,
                  reliability: ReliabilitySettings | None = None) -> TrainingPlan:
    """The fastest layout that fits in memory (by step time), as a full plan."""
    best: tuple[float, Layout] | None = None
    usable = cluster.usable_memory_bytes
    for layout in candidate_layouts(spec, settings, cluster):
        if memory_breakdown(spec, settings, layout).total_bytes > usable:
            continue
        step_s = step_breakdown(spec, settings, layout, cluster).step_time_s
        if best is None or step_s < best[0]:
            best = (step_s, layout)
    if best is None:
        raise PlanError(
            f"no layout of {spec.num_params() / 1e9:.1f}B parameters fits {cluster.n_devices} x "
            f"{cluster.accelerator.id} ({cluster.accelerator.memory_gb:g} GB) with a global batch of "
            f"{settings.global_batch_seqs} sequences; add devices or change the batch"
        )
    return plan_training(spec, cluster, settings, best[1], tokens, costs, reliability)


def min_devices_to_fit(spec: ModelSpec, cluster: Cluster, settings: TrainSettings) -> int | None:
    """The smallest power-of-two device count on which some layout fits (up to 65,536), or None."""
    for exponent in range(0, 17):
        n = 2**exponent
        trial = replace(cluster, n_devices=n)
        usable = trial.usable_memory_bytes
        for layout in candidate_layouts(spec, settings, trial):
            if memory_breakdown(spec, settings, layout).total_bytes <= usable:
                return n
    return None


def default_global_batch_seqs(seq_len: int, batch_tokens: float = 4e6) -> int:
    """A power-of-two number of sequences near `batch_tokens` tokens (Llama 3 trained 405B at 4M-16M)."""
    return max(1, 2 ** round(math.log2(batch_tokens / seq_len)))
