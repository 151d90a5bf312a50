"""`aiinfra plan ...`: the planner's command line (train, compare, serve, validate, plot).

Each command parses its options, calls the planner's functions and prints rich tables. Bad input (unknown model or
hardware, an impossible layout) prints one line naming it and exits with code 2.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.inference import ServeSettings, plan_serving, validate_inference
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.prices import parse_prices
from aiinfra.plan.reliability import ReliabilitySettings
from aiinfra.plan.training import (
    USABLE_MEMORY_FRACTION,
    CostSettings,
    TrainingPlan,
    default_global_batch_seqs,
    min_devices_to_fit,
    plan_training,
    search_layout,
)
from aiinfra.plan.validation import memory_check, validate_training
from aiinfra.spec import PRESETS, ModelSpec, preset

plan_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Plan clusters: memory, step time, MFU, days, cost, energy, goodput; serving fleets.")
# Tables are wide; when stdout is not a terminal (pipes, files, tests) rich would fold them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_COMPARE = "a100-sxm-80gb,h100-sxm-80gb,h200,b200,mi300x,tpu-v5p"


def _clear_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn planner input errors into one line on stderr and exit code 2, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (PlanError, KeyError) as error:
            print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
            raise typer.Exit(2) from None
        except ValidationError as error:
            first = error.errors()[0]
            print(f"error: model: {first['msg']}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def resolve_model(name: str, seq_len: int | None = None) -> ModelSpec:
    """A preset by name (with max_seq_len raised to `seq_len` if needed), or PlanError listing the presets."""
    if name not in PRESETS:
        raise PlanError(f"unknown model {name!r}; known: {', '.join(PRESETS)}")
    spec = preset(name)
    if seq_len and seq_len > spec.max_seq_len:
        spec = preset(name, max_seq_len=seq_len)
    return spec


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f} GB"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.0f}"


def print_training_plan(plan: TrainingPlan) -> None:
    """The readable report of one training plan."""
    spec, cluster, step, memory = plan.spec, plan.cluster, plan.step, plan.memory
    console.print(
        f"[bold]{spec.num_params() / 1e9:.1f}B parameters[/] ({spec.num_params(active_only=True) / 1e9:.1f}B active) "
        f"on {cluster.n_devices} x {cluster.accelerator.id}; layout [bold]{plan.layout.describe()}[/]; "
        f"{plan.settings.global_batch_seqs} x {plan.settings.seq_len} tokens per step"
    )
    mem = Table(title="memory per device")
    mem.add_column("weights"), mem.add_column("gradients"), mem.add_column("optimizer")
    mem.add_column("activations"), mem.add_column("total"), mem.add_column("capacity")
    capacity = f"{_gb(cluster.memory_bytes)} ({'fits' if plan.fits else 'DOES NOT FIT'})"
    mem.add_row(_gb(memory.weights_bytes), _gb(memory.gradients_bytes), _gb(memory.optimizer_bytes),
                _gb(memory.activations_bytes), _gb(memory.total_bytes), capacity)
    console.print(mem)
    times = Table(title=f"step time ({step.micro_batches} micro-batches)")
    for name in ("compute", "TP comm", "CP/EP comm", "PP p2p", "bubble", "DP comm", "optimizer", "step"):
        times.add_column(name, justify="right")
    times.add_row(*(f"{v:.3f} s" for v in (step.compute_s, step.tp_comm_s, step.other_comm_s, step.pp_p2p_s,
                                            step.bubble_s, step.dp_comm_s, step.optimizer_s, step.step_time_s)))
    console.print(times)
    run = Table(title=f"run of {plan.tokens:.3g} tokens")
    for name in ("tokens/s", "MFU", "HFU", "days (ideal)", "days (with failures)", "device-hours", "energy",
                 "cost"):
        run.add_column(name, justify="right")
    energy = plan.energy_mwh
    run.add_row(f"{plan.tokens_per_s:,.0f}", f"{plan.mfu:.3f}", f"{plan.hfu:.3f}", f"{plan.ideal_days:,.1f}",
                f"{plan.wall_days:,.1f}", f"{plan.device_hours:,.0f}",
                "-" if energy is None else f"{energy:,.0f} MWh", _money(plan.cost))
    console.print(run)
    rel = plan.reliability
    console.print(
        f"reliability: job MTBF {rel.job_mtbf_s / 3600:.1f} h, checkpoint {_gb(rel.checkpoint_bytes)} blocks "
        f"{rel.checkpoint_cost_s:.1f} s every {rel.checkpoint_interval_s / 60:.1f} min (Young/Daly), "
        f"{rel.expected_interruptions:,.0f} expected interruptions, goodput {rel.goodput:.3f}"
    )
    console.print("MFU = 3 x forward FLOPs (6N + full-sequence attention) / (step x devices x dense peak); "
                  "HFU adds recomputed forward FLOPs.", style="dim")


@plan_app.command()
@_clear_errors
def train(
    model: str = typer.Option("llama3-70b", help="model preset"),
    tokens: float = typer.Option(1e12, help="training tokens"),
    hardware: str = typer.Option("h100-sxm-80gb", help="hardware id from the catalog"),
    devices: int = typer.Option(1024, help="number of devices"),
    seq_len: int = typer.Option(0, help="sequence length (default: the model's)"),
    global_batch: int = typer.Option(0, help="sequences per step (default: about 4M tokens)"),
    precision: str = typer.Option("bf16", help="bf16, fp16 or fp8"),
    search: bool = typer.Option(False, "--search", help="find the fastest layout that fits"),
    tp: int = typer.Option(1), pp: int = typer.Option(1), cp: int = typer.Option(1), ep: int = typer.Option(1),
    vp: int = typer.Option(1, help="virtual stages (interleaved schedule)"),
    schedule: str = typer.Option("", help="gpipe, 1f1b or interleaved (default: interleaved when vp > 1)"),
    zero: int = typer.Option(1, help="ZeRO stage 0-3 (3 = FSDP)"),
    micro_batch: int = typer.Option(1),
    recompute: str = typer.Option("none", help="none, selective or full"),
    sp: bool = typer.Option(True, help="sequence parallelism when tp > 1"),
    price: float = typer.Option(0.0, help="USD per device-hour (default: prices.csv, if listed)"),
    pue: float = typer.Option(1.1, help="data-centre PUE"),
    async_checkpoint: bool = typer.Option(False, help="asynchronous checkpointing"),
    json_out: bool = typer.Option(False, "--json", help="also print one JSON line of the headline figures"),
) -> None:
    """Predict a training run: memory, step time, MFU, days, device-hours, energy, cost and goodput."""
    spec = resolve_model(model, seq_len or None)
    seq = seq_len or spec.max_seq_len
    if precision not in ("bf16", "fp16", "fp8"):
        raise PlanError(f"--precision={precision!r}: expected bf16, fp16 or fp8")
    if recompute not in ("none", "selective", "full"):
        raise PlanError(f"--recompute={recompute!r}: expected none, selective or full")
    settings = TrainSettings(seq_len=seq, global_batch_seqs=global_batch or default_global_batch_seqs(seq),
                             precision=precision)  # type: ignore[arg-type]
    cluster = make_cluster(hardware, devices)
    costs = CostSettings(price_per_device_hour=price or parse_prices([]).get(hardware), pue=pue)
    reliability = ReliabilitySettings(async_checkpoint=async_checkpoint)
    if search:
        plan = search_layout(spec, cluster, settings, tokens, costs, reliability)
    else:
        if devices % (tp * pp * cp):
            raise PlanError(f"tp x pp x cp = {tp * pp * cp} does not divide --devices={devices}")
        chosen = schedule or ("interleaved" if vp > 1 else "1f1b")
        if chosen not in ("gpipe", "1f1b", "interleaved"):
            raise PlanError(f"--schedule={schedule!r}: expected gpipe, 1f1b or interleaved")
        layout = Layout(tp=tp, pp=pp, dp=devices // (tp * pp * cp), cp=cp, ep=ep, virtual_stages=vp,
                        schedule=chosen, zero_stage=zero, micro_batch=micro_batch,  # type: ignore[arg-type]
                        recompute=recompute, sequence_parallel=sp and tp > 1)  # type: ignore[arg-type]
        plan = plan_training(spec, cluster, settings, layout, tokens, costs, reliability)
    print_training_plan(plan)
    if json_out:
        print(json.dumps({"layout": plan.layout.describe(), "step_time_s": round(plan.step.step_time_s, 4),
                          "mfu": round(plan.mfu, 4), "memory_per_device_gb": round(plan.memory.total_bytes / 1e9, 2),
                          "wall_days": round(plan.wall_days, 2), "goodput": round(plan.reliability.goodput, 4)}))


@plan_app.command()
@_clear_errors
def compare(
    model: str = typer.Option("llama3-70b", help="model preset"),
    tokens: float = typer.Option(1e12, help="training tokens"),
    devices: int = typer.Option(1024, help="devices of each kind"),
    hardware: str = typer.Option(DEFAULT_COMPARE, help="comma-separated hardware ids"),
    seq_len: int = typer.Option(0, help="sequence length (default: the model's)"),
    global_batch: int = typer.Option(0, help="sequences per step (default: about 4M tokens)"),
    price: Annotated[list[str] | None, typer.Option(help="HARDWARE=USD per device-hour (repeatable)")] = None,
) -> None:
    """Hardware side by side for one model: best layout, MFU, time, cost, energy and devices needed to fit."""
    spec = resolve_model(model, seq_len or None)
    seq = seq_len or spec.max_seq_len
    settings = TrainSettings(seq_len=seq, global_batch_seqs=global_batch or default_global_batch_seqs(seq))
    prices = parse_prices(price or [])
    table = Table(title=f"{model}, {tokens:.3g} tokens, {devices} devices each")
    for name in ("hardware", "layout", "MFU", "tokens/s", "days", "device-hours", "energy MWh", "cost",
                 "min devices to fit"):
        table.add_column(name, justify="left" if name in ("hardware", "layout") else "right")
    for hw in [h.strip() for h in hardware.split(",") if h.strip()]:
        cluster = make_cluster(hw, devices)
        try:
            cluster.peak_flops("bf16")
        except PlanError as error:
            table.add_row(hw, f"not a training device: {error}", *["-"] * 7)
            continue
        fewest = min_devices_to_fit(spec, cluster, settings)
        try:
            plan = search_layout(spec, cluster, settings, tokens, CostSettings(price_per_device_hour=prices.get(hw)))
        except PlanError:
            table.add_row(hw, "does not fit", *["-"] * 6, str(fewest or "-"))
            continue
        energy = plan.energy_mwh
        table.add_row(hw, plan.layout.describe(), f"{plan.mfu:.3f}", f"{plan.tokens_per_s:,.0f}",
                      f"{plan.wall_days:,.1f}", f"{plan.device_hours:,.0f}",
                      "-" if energy is None else f"{energy:,.0f}", _money(plan.cost), str(fewest or "-"))
    console.print(table)


@plan_app.command()
@_clear_errors
def serve(
    model: str = typer.Option("llama3-8b", help="model preset"),
    hardware: str = typer.Option("h100-sxm-80gb", help="hardware id from the catalog"),
    rps: float = typer.Option(10.0, help="requests per second to serve"),
    input_tokens: int = typer.Option(1000, help="prompt length"),
    output_tokens: int = typer.Option(1000, help="output length"),
    ttft_slo_ms: float = typer.Option(0.0, help="time-to-first-token SLO (0: none)"),
    tpot_slo_ms: float = typer.Option(0.0, help="time-per-output-token SLO (0: none)"),
    quant: str = typer.Option("fp8", help="weights: bf16, fp8, int8 or int4"),
    kv_dtype: str = typer.Option("", help="KV cache: bf16 or fp8 (default: fp8 with fp8 weights, else bf16)"),
    tp: int = typer.Option(1, help="tensor parallel degree of a replica"),
    max_batch: int = typer.Option(2048, help="engine's maximum batch"),
    price: float = typer.Option(0.0, help="USD per device-hour (default: prices.csv, if listed)"),
) -> None:
    """Size an inference fleet: batch, KV cache, tokens/s, TTFT/TPOT, replicas and cost per million tokens."""
    spec = resolve_model(model)
    if spec.max_seq_len < input_tokens + output_tokens:
        spec = preset(model, max_seq_len=input_tokens + output_tokens)
    kv = kv_dtype or ("fp8" if quant == "fp8" else "bf16")
    if kv not in ("bf16", "fp8"):
        raise PlanError(f"--kv-dtype={kv!r}: expected bf16 or fp8")
    settings = ServeSettings(input_tokens=input_tokens, output_tokens=output_tokens, weight_dtype=quant,
                             kv_dtype=kv, tp=tp, max_batch=max_batch, requests_per_s=rps,
                             ttft_slo_s=ttft_slo_ms / 1e3 or None, tpot_slo_s=tpot_slo_ms / 1e3 or None)
    plan = plan_serving(spec, make_cluster(hardware, tp), settings)
    unit_price = price or parse_prices([]).get(hardware)
    table = Table(title=f"{model} on {hardware} x tp={tp}, {quant} weights, {kv} KV cache, "
                        f"{input_tokens} in / {output_tokens} out, {rps:g} req/s")
    for name in ("batch (bound)", "weights/device", "KV cache/device", "KV/token", "TTFT", "TPOT",
                 "output tok/s/replica", "replicas", "devices", "$/M output tokens"):
        table.add_column(name, justify="right")
    table.add_row(f"{plan.batch} ({plan.limited_by})", _gb(plan.weights_bytes_per_device),
                  _gb(plan.kv_cache_bytes_per_device), f"{plan.kv_bytes_per_token / 1e3:.0f} kB",
                  f"{plan.ttft_s * 1e3:.0f} ms", f"{plan.step_time_s * 1e3:.1f} ms",
                  f"{plan.output_tokens_per_s:,.0f}", str(plan.replicas), str(plan.devices),
                  "-" if unit_price is None else f"{plan.cost_per_million_output_tokens(unit_price):.3f}")
    console.print(table)


def _error_summary(errors: list[float]) -> tuple[float, float]:
    absolute = [abs(e) for e in errors]
    return statistics.mean(absolute), max(absolute)


@plan_app.command()
@_clear_errors
def validate() -> None:
    """Predict every published run (training, memory, inference) and print the error per row and the mean."""
    rows = validate_training()
    table = Table(title="published training runs: predicted vs published")
    for name in ("run", "metric", "published", "predicted", "error", "layout (unstated knobs searched)"):
        table.add_column(name, justify="right" if name in ("published", "predicted", "error") else "left")
    for r in rows:
        table.add_row(r.run_id, r.metric, f"{r.published:g}", f"{r.predicted:.3g}", f"{100 * r.error:+.1f}%",
                      r.layout)
    mape, max_ape = _error_summary([r.error for r in rows])
    table.add_row("mean |error|", "", "", "", f"{100 * mape:.1f}%", f"max {100 * max_ape:.1f}%")
    console.print(table)

    memory = memory_check()
    mem_table = Table(title="activation memory, first stage, vs Korthikanti et al. 2022 (Table 2 x L)")
    for name in ("model", "case", "ours", "Korthikanti", "error", "params ours", "params paper"):
        mem_table.add_column(name, justify="left" if name in ("model", "case") else "right")
    for m in memory:
        mem_table.add_row(m.model, m.case, _gb(m.predicted_bytes), _gb(m.reference_bytes), f"{100 * m.error:+.1f}%",
                          f"{m.params / 1e9:.1f}B", f"{m.reference_params / 1e9:.0f}B")
    console.print(mem_table)

    serving = validate_inference()
    inf_table = Table(title="published inference runs: predicted vs published")
    for name in ("run", "metric", "published", "predicted", "error", "batch (bound)", "in headline"):
        inf_table.add_column(name, justify="left" if name in ("run", "metric") else "right")
    for s in serving:
        predicted = f"{s.predicted:,.4g}" if s.predicted < 1000 else f"{s.predicted:,.0f}"
        inf_table.add_row(s.run_id, s.metric, f"{s.published:,g}", predicted, f"{100 * s.error:+.1f}%",
                          f"{s.batch} ({s.limited_by})", "yes" if s.headline else "no")
    console.print(inf_table)

    headline = [s for s in serving if s.headline]
    inf_mape, inf_max = _error_summary([s.error for s in headline])
    worst = max(rows, key=lambda r: abs(r.error))
    print(json.dumps({
        "validate_mape": round(mape, 4), "validate_max_ape": round(max_ape, 4), "rows": len(rows),
        "worst_row": worst.run_id,
        "memory_max_ape": round(max(abs(m.error) for m in memory), 4), "memory_rows": len(memory),
        "inference_mape": round(inf_mape, 4), "inference_max_ape": round(inf_max, 4),
        "inference_rows": len(headline),
    }))


@plan_app.command()
@_clear_errors
def plot(
    out: Annotated[Path, typer.Option(help="output prefix: writes OUT-scaling.png/.svg and OUT-frontier.png/.svg")],
    model: str = typer.Option("llama3-70b", help="model preset"),
    tokens: float = typer.Option(15e12, help="training tokens"),
    hardware: str = typer.Option("a100-sxm-80gb,h100-sxm-80gb,tpu-v5p", help="comma-separated hardware ids"),
    devices: str = typer.Option("256,512,1024,2048,4096,8192", help="comma-separated cluster sizes"),
    price: Annotated[list[str] | None, typer.Option(help="HARDWARE=USD per device-hour (repeatable)")] = None,
) -> None:
    """Plot MFU and days against cluster size per hardware, and the cost/time frontier (PNG and SVG)."""
    from aiinfra.plan.plots import plot_frontier, plot_scaling, scaling_points

    spec = resolve_model(model)
    try:
        counts = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise PlanError(f"--devices={devices!r}: expected comma-separated integers") from None
    settings = TrainSettings(seq_len=spec.max_seq_len, global_batch_seqs=default_global_batch_seqs(spec.max_seq_len))
    names = [h.strip() for h in hardware.split(",") if h.strip()]
    for name in names:
        make_cluster(name, 1)  # unknown hardware fails here with its one-line error
    points = scaling_points(spec, names, counts, settings, tokens, parse_prices(price or []))
    stem = out.name
    written = plot_scaling(points, f"{model}, {tokens:.3g} tokens", out.with_name(f"{stem}-scaling"))
    written += plot_frontier(points, f"{model}: cost against time", out.with_name(f"{stem}-frontier"))
    for path in written:
        console.print(f"wrote {path}")


__all__ = ["plan_app", "USABLE_MEMORY_FRACTION"]
