"""The parallel layout and the training settings, as small frozen dataclasses with their checks.

Rank order follows Megatron-LM (tensor, context, data, pipeline from innermost to outermost), so tensor-parallel
groups sit inside a scale-up domain first and pipeline stages are furthest apart. Expert parallelism reuses the
data-parallel (and context-parallel) ranks, as in Megatron-Core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from aiinfra.plan.errors import PlanError
from aiinfra.spec import ModelSpec

Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved"]
Precision = Literal["bf16", "fp16", "fp8", "fp32"]
AttentionKernel = Literal["flash", "materialized"]


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism and the per-device execution choices."""

    tp: int = 1  # tensor parallel (Megatron column/row split of every layer)
    pp: int = 1  # pipeline stages
    dp: int = 1  # data-parallel replicas (sharded under ZeRO/FSDP)
    cp: int = 1  # context parallel (sequence split across devices for attention)
    ep: int = 1  # expert parallel (within dp x cp)
    virtual_stages: int = 1  # model chunks per device under the interleaved schedule
    schedule: Schedule = "1f1b"
    zero_stage: int = 0  # 0: replicated; 1: optimizer sharded; 2: + gradients; 3 (FSDP): + parameters
    micro_batch: int = 1  # sequences per micro-batch
    recompute: Recompute = "none"
    sequence_parallel: bool = False  # shard norms/dropout along the sequence inside the TP group

    @property
    def n_devices(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def describe(self) -> str:
        """A compact one-line description such as 'TP8 PP16(interleaved x4) DP64 ZeRO-1 mb1 selective SP'."""
        parts = [f"TP{self.tp}"]
        if self.pp > 1:
            schedule = f"{self.schedule} x{self.virtual_stages}" if self.schedule == "interleaved" else self.schedule
            parts.append(f"PP{self.pp}({schedule})")
        parts.append(f"DP{self.dp}")
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        parts += [f"ZeRO-{self.zero_stage}", f"mb{self.micro_batch}", f"recompute={self.recompute}"]
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainSettings:
    """What is trained and with which numerics and software behaviour."""

    seq_len: int
    global_batch_seqs: int
    precision: Precision = "bf16"
    attention_kernel: AttentionKernel = "flash"  # flash: scores never reach HBM (Dao et al. 2022)
    dropout: bool = False  # GPT-style dropout stores masks and costs memory traffic
    param_bytes: int = 2  # working copy of the weights
    grad_bytes: int = 4  # gradient accumulation buffer (Megatron keeps fp32 main grads under bf16)
    grad_reduce_bytes: int = 4  # bytes per gradient on the wire in the data-parallel reduction
    optimizer_bytes_per_param: int = 12  # fp32 master weights + Adam's two moments (Rajbhandari et al. 2020)
    dp_overlap: bool = True  # data-parallel collectives overlap the backward/forward passes
    tp_overlap: bool = False  # tensor-parallel collectives overlap their GEMMs (Megatron-Core tp-comm-overlap)
    p2p_scatter_gather: bool = True  # pipeline sends split across the TP ranks (Narayanan et al. 2021, 4.1)

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_seqs


def layers_per_stage(spec: ModelSpec, layout: Layout) -> int:
    """Layers on the most loaded pipeline stage (uneven splits round up)."""
    return math.ceil(spec.n_layers / layout.pp)


def micro_batches(settings: TrainSettings, layout: Layout) -> int:
    """Micro-batches each pipeline processes per step: global batch / (dp x micro-batch)."""
    return settings.global_batch_seqs // (layout.dp * layout.micro_batch)


def check_layout(spec: ModelSpec, settings: TrainSettings, layout: Layout, n_devices: int) -> None:
    """Raise PlanError naming the first impossible choice of a layout."""
    if min(layout.tp, layout.pp, layout.dp, layout.cp, layout.ep, layout.virtual_stages, layout.micro_batch) < 1:
        raise PlanError(f"layout {layout.describe()}: every degree and the micro-batch must be >= 1")
    if layout.n_devices != n_devices:
        raise PlanError(
            f"tp x pp x dp x cp = {layout.tp}x{layout.pp}x{layout.dp}x{layout.cp} = {layout.n_devices}, "
            f"but --devices={n_devices}"
        )
    if spec.n_heads % layout.tp:
        raise PlanError(f"tp={layout.tp} must divide n_heads={spec.n_heads}")
    if layout.pp > spec.n_layers:
        raise PlanError(f"pp={layout.pp} exceeds n_layers={spec.n_layers}")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage={layout.zero_stage}: expected 0, 1, 2 or 3")
    if layout.schedule == "interleaved":
        if layout.pp < 2:
            raise PlanError("the interleaved schedule needs pp >= 2")
        if layout.virtual_stages > layers_per_stage(spec, layout):
            raise PlanError(
                f"virtual_stages={layout.virtual_stages} exceeds the {layers_per_stage(spec, layout)} layers "
                "of a stage"
            )
    elif layout.virtual_stages != 1:
        raise PlanError(f"virtual_stages={layout.virtual_stages} needs schedule=interleaved")
    if settings.seq_len % layout.cp:
        raise PlanError(f"cp={layout.cp} must divide seq_len={settings.seq_len}")
    if settings.global_batch_seqs % (layout.dp * layout.micro_batch):
        raise PlanError(
            f"global batch {settings.global_batch_seqs} sequences is not divisible by "
            f"dp x micro_batch = {layout.dp}x{layout.micro_batch}"
        )
    if layout.ep > 1:
        if not spec.is_moe:
            raise PlanError(f"ep={layout.ep} needs a mixture-of-experts model")
        if spec.n_experts % layout.ep or (layout.dp * layout.cp) % layout.ep:
            raise PlanError(f"ep={layout.ep} must divide n_experts={spec.n_experts} and dp x cp")
    if layout.sequence_parallel and layout.tp == 1:
        raise PlanError("sequence parallelism needs tp >= 2")
