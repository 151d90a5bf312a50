"""`aiinfra plan ...`: the planner's command line (train, compare, serve, validate, plot).

Each command parses its options, calls the planner's functions and prints rich tables. Bad input (unknown model or
hardware, an impossible layout) prints one line naming it and exits with code 2.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from aiinfra.plan.calibrated import calibrated
from aiinfra.plan.cells import CSV_ENCODING
from aiinfra.plan.cluster import Cluster, make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.from_config import configured_run, load_run_config
from aiinfra.plan.inference import ServeSettings, plan_serving
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.marks import generation_mark
from aiinfra.plan.models import published_serving, resolve_model
from aiinfra.plan.prices import parse_prices, price_for
from aiinfra.plan.reliability import ReliabilitySettings
from aiinfra.plan.serve_rows import ENGINE_NAMES, INFERENCE_RUNS_CSV, engine_name, engine_settings
from aiinfra.plan.training import (
    CostSettings,
    TrainingPlan,
    default_global_batch_seqs,
    min_devices_to_fit,
    plan_training,
    search_layout,
)
from aiinfra.plan.validate_report import run_validation
from aiinfra.plan.validation import TRAINING_RUNS_CSV

plan_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Plan clusters: memory, step time, MFU, days, cost, energy, goodput; serving fleets.")
# Tables are wide; when stdout is not a terminal (pipes, files, tests) rich would fold them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
MODEL_HELP = "a preset, or a published model such as qwen3-235b-a22b or deepseek-r1 (the error lists all)"
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


def check_flags(**flags: tuple[float, float]) -> None:
    """Raise PlanError naming the first flag below its minimum: check_flags(tp=(value, 1), rps=(value, 1e-12))."""
    for name, (value, minimum) in flags.items():
        if not value >= minimum:
            bound = "> 0" if 0 < minimum < 1e-6 else f">= {minimum:g}"
            raise PlanError(f"--{name.replace('_', '-')}={value:g}: must be {bound}")


POSITIVE = 1e-12  # the minimum of a flag that must be strictly positive


def fitted_cluster(hardware: str, n_devices: int) -> Cluster:
    """A catalog cluster with the GEMM ceilings fitted on the published runs (see `plan validate`)."""
    return calibrated(make_cluster(hardware, n_devices))


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
    for name in ("compute", "TP comm", "CP/EP/host", "PP p2p", "bubble", "DP comm", "optimizer", "step"):
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
    model: str = typer.Option("llama3-70b", help=MODEL_HELP),
    tokens: float = typer.Option(1e12, help="training tokens"),
    hardware: str = typer.Option("h100-sxm-80gb", help="hardware id from the catalog"),
    devices: int = typer.Option(1024, help="number of devices"),
    seq_len: int = typer.Option(0, help="sequence length (0: the model's)"),
    global_batch: int = typer.Option(0, help="sequences per step (0: about 4M tokens, rounded up to a micro-batch "
                                     "on every data-parallel replica)"),
    precision: str = typer.Option("bf16", help="bf16, fp16, fp8 or fp4"),
    search: bool = typer.Option(False, "--search", help="find the fastest layout that fits"),
    config: Annotated[Path | None, typer.Option(help="a training TOML or run directory: predict that run")] = None,
    tp: int = typer.Option(1, help="tensor-parallel degree (Megatron column/row split of every layer)"),
    pp: int = typer.Option(1, help="pipeline stages"),
    cp: int = typer.Option(1, help="context-parallel degree (the sequence split across devices for attention)"),
    ep: int = typer.Option(1, help="expert-parallel degree (within dp x cp)"),
    dp_replicate: int = typer.Option(0, help="replicas that all-reduce gradients (0: the devices left over)"),
    dp_shard: int = typer.Option(0, help="ranks that shard the model states (0: all data-parallel ranks)"),
    vp: int = typer.Option(1, help="virtual stages per rank (interleaved_1f1b)"),
    pp_schedule: str = typer.Option("", help="gpipe, 1f1b or interleaved_1f1b (default: interleaved_1f1b when vp > 1)"),
    zero: int = typer.Option(1, help="ZeRO stage 0-3 over dp_shard (3 = FSDP)"),
    micro_batch: int = typer.Option(1, help="sequences per micro-batch"),
    recompute: str = typer.Option("none", help="none, selective or full"),
    sp: bool = typer.Option(True, help="sequence parallelism when tp > 1"),
    price: float = typer.Option(0.0, help="USD per device-hour (0: prices.csv, if listed)"),
    pue: float = typer.Option(1.1, help="data-centre PUE"),
    async_checkpoint: bool = typer.Option(False, help="asynchronous checkpointing"),
    json_out: bool = typer.Option(False, "--json", help="also print one JSON line of the headline figures"),
) -> None:
    """Predict a training run: memory, step time, MFU, days, device-hours, energy, cost and goodput."""
    check_flags(tokens=(tokens, POSITIVE), devices=(devices, 1), seq_len=(seq_len, 0), global_batch=(global_batch, 0),
                tp=(tp, 1), pp=(pp, 1), cp=(cp, 1), ep=(ep, 1), dp_replicate=(dp_replicate, 0),
                dp_shard=(dp_shard, 0), vp=(vp, 1), zero=(zero, 0), micro_batch=(micro_batch, 1),
                price=(price, 0), pue=(pue, 1))
    if zero > 3:
        raise PlanError(f"--zero={zero}: expected 0, 1, 2 or 3")
    if precision not in ("bf16", "fp16", "fp8", "fp4"):
        raise PlanError(f"--precision={precision!r}: expected bf16, fp16, fp8 or fp4")
    if recompute not in ("none", "selective", "full"):
        raise PlanError(f"--recompute={recompute!r}: expected none, selective or full")
    costs = CostSettings(price_per_device_hour=price or price_for(parse_prices([]), hardware), pue=pue)
    reliability = ReliabilitySettings(async_checkpoint=async_checkpoint)
    if config is not None:
        run = configured_run(load_run_config(config))
        plan = plan_training(run.spec, fitted_cluster(hardware, run.n_devices), run.settings, run.layout,
                             run.tokens, costs, reliability)
    else:
        named = resolve_model(model, seq_len or None)
        spec = named.spec
        seq = seq_len or spec.max_seq_len
        settings = TrainSettings(seq_len=seq, global_batch_seqs=global_batch or default_global_batch_seqs(seq),
                                 precision=precision, **named.train_settings)  # type: ignore[arg-type]
        cluster = fitted_cluster(hardware, devices)
        if search:
            plan = search_layout(spec, cluster, settings, tokens, costs, reliability)
        else:
            layout = _explicit_layout(devices, tp, pp, cp, ep, dp_replicate, dp_shard, vp, pp_schedule, zero,
                                      micro_batch, recompute, sp)
            if not global_batch:  # the default batch, rounded up to whole micro-batches on every replica
                per_step = layout.dp * layout.micro_batch
                settings = replace(settings, global_batch_seqs=-(-settings.global_batch_seqs // per_step) * per_step)
            plan = plan_training(spec, cluster, settings, layout, tokens, costs, reliability)
    print_training_plan(plan)
    console.print(generation_mark(plan.cluster.accelerator.id))
    if not plan.fits:  # the figures above are for a run that could not start: say so where the eye ends
        console.print(f"[bold red]does not fit[/]: {plan.layout.describe()} needs "
                      f"{plan.memory.total_bytes / 2**30:.1f} GiB per device, "
                      f"{plan.cluster.usable_memory_bytes / 2**30:.1f} GiB usable of "
                      f"{plan.cluster.memory_bytes / 2**30:.1f} GiB; the figures above are for a run that cannot "
                      "start (--search finds the fastest layout that fits, or raise --tp, --pp or --zero)")
    if json_out:
        print(json.dumps({"layout": plan.layout.describe(), "step_time_s": round(plan.step.step_time_s, 4),
                          "mfu": round(plan.mfu, 4), "memory_per_device_gb": round(plan.memory.total_bytes / 1e9, 2),
                          "fits": plan.fits, "wall_days": round(plan.wall_days, 2),
                          "goodput": round(plan.reliability.goodput, 4)}))


def _explicit_layout(devices: int, tp: int, pp: int, cp: int, ep: int, dp_replicate: int, dp_shard: int, vp: int,
                     pp_schedule: str, zero: int, micro_batch: int, recompute: str, sp: bool) -> Layout:
    """The layout the flags describe; the data-parallel degrees default to the devices left over."""
    if devices % (tp * pp * cp):
        raise PlanError(f"tp x pp x cp = {tp * pp * cp} does not divide --devices={devices}")
    dp = devices // (tp * pp * cp)
    shard = dp_shard or (dp // (dp_replicate or 1) if zero else 1)
    replicate = dp_replicate or max(1, dp // shard)
    if replicate * shard != dp:
        raise PlanError(f"--dp-replicate x --dp-shard = {replicate}x{shard} but the devices leave dp = {dp}")
    chosen = pp_schedule or ("interleaved_1f1b" if vp > 1 else "1f1b")
    if chosen not in ("gpipe", "1f1b", "interleaved_1f1b"):
        raise PlanError(f"--pp-schedule={pp_schedule!r}: expected gpipe, 1f1b or interleaved_1f1b")
    return Layout(tp=tp, pp=pp, dp_replicate=replicate, dp_shard=shard, cp=cp, ep=ep, virtual_stages=vp,
                  pp_schedule=chosen, zero_stage=zero, micro_batch=micro_batch,  # type: ignore[arg-type]
                  recompute=recompute, sequence_parallel=sp and tp > 1)  # type: ignore[arg-type]


@plan_app.command()
@_clear_errors
def compare(
    model: str = typer.Option("llama3-70b", help=MODEL_HELP),
    tokens: float = typer.Option(1e12, help="training tokens"),
    devices: int = typer.Option(1024, help="devices of each kind"),
    hardware: str = typer.Option(DEFAULT_COMPARE, help="comma-separated hardware ids"),
    seq_len: int = typer.Option(0, help="sequence length (default: the model's)"),
    global_batch: int = typer.Option(0, help="sequences per step (default: about 4M tokens)"),
    price: Annotated[list[str] | None, typer.Option(help="HARDWARE=USD per device-hour (repeatable)")] = None,
) -> None:
    """Hardware side by side for one model: best layout, MFU, time, cost, energy and devices needed to fit."""
    check_flags(tokens=(tokens, POSITIVE), devices=(devices, 1), seq_len=(seq_len, 0), global_batch=(global_batch, 0))
    named = resolve_model(model, seq_len or None)
    spec = named.spec
    seq = seq_len or spec.max_seq_len
    settings = TrainSettings(seq_len=seq, global_batch_seqs=global_batch or default_global_batch_seqs(seq),
                             **named.train_settings)
    prices = parse_prices(price or [])
    table = Table(title=f"{model}, {tokens:.3g} tokens, {devices} devices each")
    for name in ("hardware", "layout", "MFU", "tokens/s", "days", "device-hours", "energy MWh", "cost",
                 "min devices to fit"):
        table.add_column(name, justify="left" if name in ("hardware", "layout") else "right")
    names = [h.strip() for h in hardware.split(",") if h.strip()]
    for hw in names:
        cluster = fitted_cluster(hw, devices)
        try:
            cluster.peak_flops("bf16")
        except PlanError as error:
            table.add_row(hw, f"not a training device: {error}", *["-"] * 7)
            continue
        fewest = min_devices_to_fit(spec, cluster, settings)
        try:
            costs = CostSettings(price_per_device_hour=price_for(prices, hw))
            plan = search_layout(spec, cluster, settings, tokens, costs)
        except PlanError:
            table.add_row(hw, "does not fit", *["-"] * 6, str(fewest or "-"))
            continue
        energy = plan.energy_mwh
        table.add_row(hw, plan.layout.describe(), f"{plan.mfu:.3f}", f"{plan.tokens_per_s:,.0f}",
                      f"{plan.wall_days:,.1f}", f"{plan.device_hours:,.0f}",
                      "-" if energy is None else f"{energy:,.0f}", _money(plan.cost), str(fewest or "-"))
    console.print(table)
    for hw in names:
        console.print(f"{hw}: {generation_mark(hw)}")


@plan_app.command()
@_clear_errors
def serve(
    model: str = typer.Option("llama3-8b", help=MODEL_HELP),
    hardware: str = typer.Option("h100-sxm-80gb", help="hardware id from the catalog"),
    rps: float = typer.Option(10.0, help="requests per second to serve"),
    input_tokens: int = typer.Option(1000, help="prompt length"),
    output_tokens: int = typer.Option(1000, help="output length"),
    ttft_slo_ms: float = typer.Option(0.0, help="time-to-first-token SLO (0: none)"),
    tpot_slo_ms: float = typer.Option(0.0, help="time-per-output-token SLO (0: none)"),
    quant: str = typer.Option("fp8", help="weights: bf16, fp8, fp4, int8 or int4"),
    kv_dtype: str = typer.Option("", help="KV cache: bf16 or fp8 (default: fp8 with fp8 weights, else bf16)"),
    tp: int = typer.Option(1, help="tensor parallel degree of a replica"),
    max_batch: int = typer.Option(0, help="engine's maximum batch (per rank under --attention-dp; 0: the "
                                  "engine's default, 2048 without --engine)"),
    engine: str = typer.Option("", help="apply this engine's documented behaviour: vllm, tensorrt-llm or sglang "
                               "(host work a step, default batch, which local-attention KV it frees; empty: none)"),
    attention_dp: bool = typer.Option(False, "--attention-dp", help="attention data-parallel across the tp ranks "
                                      "(each rank keeps its own sequences' KV cache and the whole attention weights)"),
    price: float = typer.Option(0.0, help="USD per device-hour (default: prices.csv, if listed)"),
) -> None:
    """Size an inference fleet: batch, KV cache, tokens/s, TTFT/TPOT, replicas and cost per million tokens."""
    check_flags(rps=(rps, POSITIVE), input_tokens=(input_tokens, 1), output_tokens=(output_tokens, 1),
                ttft_slo_ms=(ttft_slo_ms, 0), tpot_slo_ms=(tpot_slo_ms, 0), tp=(tp, 1), max_batch=(max_batch, 0),
                price=(price, 0))
    named = resolve_model(model, input_tokens + output_tokens)
    spec = named.spec
    kv = kv_dtype or ("fp8" if quant in ("fp8", "fp4") else "bf16")
    if kv not in ("bf16", "fp8"):
        raise PlanError(f"--kv-dtype={kv!r}: expected bf16 or fp8")
    named_engine = engine_name(engine)
    if named_engine not in ("", *ENGINE_NAMES.values()):
        raise PlanError(f"--engine={engine!r}: expected vllm, tensorrt-llm or sglang (or empty)")
    behaviour = engine_settings(named_engine)
    behaviour["max_batch"] = max_batch or behaviour["max_batch"]
    settings = ServeSettings(input_tokens=input_tokens, output_tokens=output_tokens, weight_dtype=quant,
                             kv_dtype=kv, tp=tp, requests_per_s=rps, **behaviour,
                             ttft_slo_s=ttft_slo_ms / 1e3 or None, tpot_slo_s=tpot_slo_ms / 1e3 or None,
                             attention_dp=attention_dp, **published_serving(named.published))
    plan = plan_serving(spec, fitted_cluster(hardware, tp), settings)
    unit_price = price or price_for(parse_prices([]), hardware)
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
    console.print(generation_mark(hardware))


# The columns without which no row of a run table can be predicted (the reference README's schema).
RUN_TABLE_COLUMNS = {"--runs": ("metric", "value", "hardware"),
                     "--inference": ("metric", "value", "hardware", "model", "n_devices")}


def check_run_table(option: str, path: Path, required: tuple[str, ...]) -> None:
    """A user's run table is a CSV of the shared schema with at least one row: PlanError naming the flag otherwise
    (not a report of zero rows, whose 0% error could not fail)."""
    if not path.is_file():
        raise PlanError(f"{option}={str(path)!r}: no such file")
    try:
        with open(path, newline="", encoding=CSV_ENCODING) as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            has_rows = next(reader, None) is not None
    except (UnicodeDecodeError, csv.Error) as error:
        raise PlanError(f"{option}={str(path)!r}: not a readable CSV ({error})") from None
    missing = [name for name in required if name not in header]
    if missing:
        raise PlanError(f"{option}={str(path)!r}: not a run table of the shared schema (no column "
                        f"{', '.join(missing)}; the packaged published_training_runs.csv and "
                        "published_inference_runs.csv under aiinfra/plan/ show every column)")
    if not has_rows:
        raise PlanError(f"{option}={str(path)!r}: no rows to validate")


@plan_app.command()
@_clear_errors
def validate(
    runs: Annotated[Path | None, typer.Option(help="training runs CSV of the shared schema")] = None,
    inference: Annotated[Path | None, typer.Option(help="inference runs CSV (default: packaged)")] = None,
    markdown: bool = typer.Option(False, "--markdown", help="print the per-row tables as Markdown"),
) -> None:
    """Predict every published run, out of sample first; print the error per row; end with one JSON line."""
    for option, path in (("--runs", runs), ("--inference", inference)):
        if path is not None:
            check_run_table(option, path, RUN_TABLE_COLUMNS[option])
    headline = run_validation(console, runs or TRAINING_RUNS_CSV, inference or INFERENCE_RUNS_CSV, markdown)
    print(json.dumps(headline))


@plan_app.command()
@_clear_errors
def plot(
    out: Annotated[Path, typer.Option(help="output prefix: writes OUT-scaling.png/.svg and OUT-frontier.png/.svg")],
    model: str = typer.Option("llama3-70b", help=MODEL_HELP),
    tokens: float = typer.Option(15e12, help="training tokens"),
    hardware: str = typer.Option("a100-sxm-80gb,h100-sxm-80gb,tpu-v5p", help="comma-separated hardware ids"),
    devices: str = typer.Option("256,512,1024,2048,4096,8192", help="comma-separated cluster sizes"),
    price: Annotated[list[str] | None, typer.Option(help="HARDWARE=USD per device-hour (repeatable)")] = None,
) -> None:
    """Plot MFU and days against cluster size per hardware, and the cost/time frontier (PNG and SVG)."""
    from aiinfra.plan.plots import plot_frontier, plot_scaling, scaling_points

    check_flags(tokens=(tokens, POSITIVE))
    named = resolve_model(model)
    spec = named.spec
    try:
        counts = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise PlanError(f"--devices={devices!r}: expected comma-separated integers") from None
    if not counts or min(counts) < 1:
        raise PlanError(f"--devices={devices!r}: every cluster size must be >= 1")
    settings = TrainSettings(seq_len=spec.max_seq_len, global_batch_seqs=default_global_batch_seqs(spec.max_seq_len),
                             **named.train_settings)
    names = [h.strip() for h in hardware.split(",") if h.strip()]
    for name in names:
        make_cluster(name, 1)  # unknown hardware fails here with its one-line error
    points = scaling_points(spec, names, counts, settings, tokens, parse_prices(price or []))
    stem = out.name
    written = plot_scaling(points, f"{model}, {tokens:.3g} tokens", out.with_name(f"{stem}-scaling"))
    written += plot_frontier(points, f"{model}: cost against time", out.with_name(f"{stem}-frontier"))
    for path in written:
        console.print(f"wrote {path}")


__all__ = ["plan_app"]
