"""`aiinfra serve MODEL` and `aiinfra bench serve`: plain typer-compatible functions (registered by cli.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from aiinfra.config import ConfigError

if TYPE_CHECKING:
    from aiinfra.serve.engine_core import EngineCore, EngineRecipe
    from aiinfra.serve.loading import ServedModel
    from aiinfra.serve.tensor_parallel import TensorParallelConfig


def _fail(message: str) -> typer.Exit:
    """A user mistake: one clear line on stderr, exit status 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3); a ValueError naming the option for anything else or for CPUs this process cannot use."""
    cpus: list[int] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--engine-cpus {text!r}: expected CPU numbers and ranges such as '1' or '0,2-3'")
        cpus += range(int(first), int(last or first) + 1)
    unavailable = sorted(set(cpus) - os.sched_getaffinity(0))
    if unavailable:
        raise ValueError(f"--engine-cpus {text!r}: CPU(s) {unavailable} are not available to this process "
                         f"(available: {sorted(os.sched_getaffinity(0))})")
    return tuple(cpus)


def free_local_endpoint() -> str:
    """127.0.0.1 and a port free now: the rendezvous of a one-node tensor-parallel server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def tensor_parallel_layout(tp: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
                           engine_process: bool) -> TensorParallelConfig:
    """--tp, --nnodes, --node-rank and --rdzv-endpoint, checked together (a ValueError naming the option)."""
    from aiinfra.serve.tensor_parallel import TensorParallelConfig

    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT (the same on every node)")
    if tp > 1 and not engine_process:
        raise ValueError(f"--tp {tp} runs the model in processes of its own: drop --no-engine-process")
    return TensorParallelConfig(tp, nnodes, node_rank, rdzv_endpoint or free_local_endpoint())


def resolve_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key (or AIINFRA_API_KEY) or from the first line of --api-key-file; not both.

    A file keeps the key out of the process list and the shell history, as a mounted secret does."""
    if api_key_file is None:
        if api_key is not None and not api_key:
            raise ValueError("--api-key is empty")
        return api_key
    if api_key is not None:
        raise ValueError("give the API key once: --api-key (or AIINFRA_API_KEY) or --api-key-file, not both")
    try:
        lines = api_key_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--api-key-file {str(api_key_file)!r}: cannot read it ({error})") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ValueError(f"--api-key-file {str(api_key_file)!r}: the file is empty (expected the key on line 1)")
    return key


def check_attention_backend(backend: str) -> None:
    """--attention-backend is one of three; native must build here (checked before any process starts)."""
    from aiinfra.serve.kernels import ATTENTION_BACKENDS, paged_decode_attention

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {backend!r}: expected {', '.join(ATTENTION_BACKENDS[:-1])} or "
                         f"{ATTENTION_BACKENDS[-1]}")
    if backend == "native" and paged_decode_attention() is None:
        raise ValueError("--attention-backend native: the kernel could not be built here (no C++ compiler, or the "
                         "build failed; see the warning above): use auto or torch")


def check_profile(profile: str, memory_mb: float | None, tp: int) -> None:
    """--profile and --memory-mb checked together (a ValueError naming the option)."""
    if profile not in ("cloud", "edge"):
        raise ValueError(f"--profile {profile!r}: expected cloud or edge")
    if profile == "cloud" and memory_mb is not None:
        raise ValueError("--memory-mb is the edge profile's budget: add --profile edge (the cloud profile sizes its "
                         "KV cache with --kv-cache-memory-mb)")
    if profile == "edge" and memory_mb is None:
        raise ValueError("--profile edge needs --memory-mb, the memory budget the server keeps to")
    if profile == "edge" and tp > 1:
        raise ValueError(f"--profile edge runs one process: drop --tp {tp}")


def _engine_core(recipe: EngineRecipe, profile: str, memory_mb: float | None,
                 engine_process: bool) -> tuple[ServedModel, EngineCore]:
    """(the served model, its engine core) for node 0: the edge profile's budgeted in-process engine, the engine in
    a process of its own (this process then needs the tokenizer and the model's shapes, not its weights), or the
    engine in this process."""
    from aiinfra.serve.engine import LLMEngine
    from aiinfra.serve.engine_core import ProcessEngineCore
    from aiinfra.serve.loading import load_model
    from aiinfra.serve.quantize import quantize_int8

    if profile == "edge":
        from aiinfra.serve.edge import load_edge_engine

        served, core, plan = load_edge_engine(recipe.model_path, memory_mb, recipe.engine_config, recipe.dtype)
        typer.echo(f"edge profile: int8 weights, 1 thread, 1 process; {plan.describe()}")
        return served, core
    if engine_process:
        return load_model(recipe.model_path, weights=False, dtype=recipe.dtype), ProcessEngineCore(recipe)
    served = load_model(recipe.model_path, dtype=recipe.dtype)
    if recipe.int8:
        quantize_int8(served.model)
    return served, LLMEngine(served.model, recipe.engine_config, served.eos_token_id)


def serve_command(
    model: Annotated[Path, typer.Argument(help="a run directory of ours or a Hugging Face Llama-format folder")],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="model id clients use (default: folder name)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="AIINFRA_API_KEY", help="require 'Bearer KEY'")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        envvar="AIINFRA_API_KEY_FILE", help="read the key to require from this file's first line")] = None,
    int8: Annotated[bool, typer.Option(help="int8 weight-only quantization (per output channel)")] = False,
    dtype: Annotated[str, typer.Option(
        help="weights and KV cache dtype: auto (the checkpoint's), bf16, fp16 or fp32")] = "auto",
    block_size: Annotated[int, typer.Option(min=1, help="tokens per KV cache block")] = 16,
    kv_cache_memory_mb: Annotated[float, typer.Option(min=0.001, help="memory budget of the KV cache, MiB")] = 256,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="requests in the running batch at most")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="tokens computed per step")] = 512,
    prefix_caching: Annotated[bool, typer.Option(help="share KV blocks of common prompt prefixes")] = True,
    pack_weights: Annotated[bool, typer.Option(
        help="CPU: oneDNN-packed copies of the weights (faster batched matmuls, twice the weight memory)")] = True,
    attention_backend: Annotated[str, typer.Option(
        help="CPU decode attention: native (our kernel over the paged cache, compiled with the system's C++ "
        "compiler on first use), torch (gather the blocks, then SDPA), auto (native where it builds)")] = "auto",
    max_waiting_requests: Annotated[int, typer.Option(min=0, help="queued requests beyond the batch")] = 256,
    max_waiting_tokens: Annotated[int, typer.Option(min=1, help="queued prompt tokens at most")] = 1 << 18,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 1 << 20,
    request_timeout_s: Annotated[float, typer.Option(min=0.001, help="per-request time limit")] = 600.0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default)")] = 0,
    engine_process: Annotated[bool, typer.Option(
        help="run the model in a process of its own, beside the HTTP server (as vLLM's V1 engine core does)")] = True,
    engine_cpus: Annotated[str, typer.Option(
        help="pin the engine process to these CPUs, e.g. '1' or '2-7' (default: not pinned)")] = "",
    tp: Annotated[int, typer.Option(min=1, help="tensor-parallel ranks (processes), over all nodes")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="nodes the --tp ranks spread over")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="this node's rank, 0..nnodes-1 (0 serves HTTP)")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        help="HOST:PORT where node 0's rank 0 meets the others, the same on every node")] = None,
    profile: Annotated[str, typer.Option(
        help="cloud: the options as given; edge: int8 weights, one thread, one process, the whole server kept to "
        "--memory-mb")] = "cloud",
    memory_mb: Annotated[float | None, typer.Option(
        min=1, help="edge: the server's memory budget, MiB (runtime, weights, a step, KV cache from the rest)")] = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API with continuous batching and a paged KV cache."""
    import torch
    import uvicorn

    from aiinfra.serve.api import ServerConfig, build_app
    from aiinfra.serve.async_engine import AsyncEngine
    from aiinfra.serve.engine import EngineConfig
    from aiinfra.serve.engine_core import EngineRecipe, run_node_workers

    if threads:
        torch.set_num_threads(threads)
    try:
        key = resolve_api_key(api_key, api_key_file)
        check_attention_backend(attention_backend)
        engine_config = EngineConfig(
            block_size=block_size, kv_cache_memory_bytes=int(kv_cache_memory_mb * 2**20), max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=prefix_caching,
            pack_weights=pack_weights, attention_backend=attention_backend,
        )
        check_profile(profile, memory_mb, tp)
        cpus = parse_cpu_list(engine_cpus)
        if cpus and not engine_process:
            raise ValueError("--engine-cpus pins the engine process; it has no effect with --no-engine-process")
        tensor_parallel = tensor_parallel_layout(tp, nnodes, node_rank, rdzv_endpoint, engine_process)
        if node_rank > 0:  # this node runs its ranks only; node 0 serves HTTP
            recipe = EngineRecipe(model, engine_config, int8, dtype, threads, tensor_parallel)
            typer.echo(f"node {node_rank}: tensor-parallel ranks {list(tensor_parallel.ranks_of_this_node())} of "
                       f"{tp}, meeting at {tensor_parallel.endpoint}")
            raise typer.Exit(run_node_workers(recipe))
        recipe = EngineRecipe(model, engine_config, int8, dtype, threads, tensor_parallel, cpus)
        served, core = _engine_core(recipe, profile, memory_mb, engine_process)
        if served_model_name:
            served.name = served_model_name
    except (ConfigError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    server_config = ServerConfig(
        api_key=key, max_body_bytes=max_body_bytes, max_waiting_requests=max_waiting_requests,
        max_waiting_tokens=max_waiting_tokens, request_timeout_s=request_timeout_s,
    )
    async_engine = AsyncEngine(core, served.tokenizer)
    app = build_app(async_engine, served, server_config)
    typer.echo(f"serving {served.name!r} ({async_engine.core.num_blocks} KV blocks of {block_size} tokens) on "
               f"http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def bench_serve_command(
    base_url: Annotated[str, typer.Option(help="server root, e.g. http://127.0.0.1:8000")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="model id (default: the first of /v1/models)")] = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="requests to send")] = 64,
    request_rate: Annotated[float, typer.Option(help="mean arrivals per second (inf: all at once)")] = float("inf"),
    burstiness: Annotated[float, typer.Option(min=0.001, help="gamma shape: 1 is Poisson, <1 burstier")] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(min=1, help="requests in flight at most")] = None,
    input_len: Annotated[int, typer.Option(min=1, help="mean prompt length, in words")] = 64,
    output_len: Annotated[int, typer.Option(min=1, help="mean max_tokens")] = 64,
    range_ratio: Annotated[float, typer.Option(min=0, max=0.999, help="lengths uniform in mean*(1 +- ratio)")] = 0.0,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="goodput SLO on time to first token")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="goodput SLO on time per output token")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key to send")] = None,
    seed: Annotated[int, typer.Option(help="seed of lengths, prompts and arrivals")] = 0,
    json_out: Annotated[Path | None, typer.Option(help="also write the results here")] = None,
) -> None:
    """Load an OpenAI-compatible server (ours or any other) and report throughput, TTFT, TPOT, ITL and goodput."""
    from aiinfra.serve.loadgen import LoadSpec, format_report, run_load

    spec = LoadSpec(
        base_url=base_url, model=model, num_prompts=num_prompts, request_rate=request_rate, burstiness=burstiness,
        max_concurrency=max_concurrency, input_len=input_len, output_len=output_len, range_ratio=range_ratio,
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, api_key=api_key, seed=seed,
    )
    try:
        report = asyncio.run(run_load(spec))
    except (ConnectionError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(format_report(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report))
