"""Where the synchronous engine runs: a thread of the server's process, or a process of its own.

Both run the same loop (`run_engine_loop`): drain the commands (add, abort) that arrived since the last step, run
one step, deliver its outputs, block when there is nothing to do. The event loop side sees one `StepResult` per
step through a callback on its own thread.

`ProcessEngineCore` is the layout vLLM moved to in its V1 engine: the model runs in a separate process, so the
HTTP server, tokenization, detokenization and SSE framing never hold the interpreter lock the model's step needs.
In one process, every small torch op of a step waits for the lock behind the event loop (up to the 5 ms switch
interval each time), and the step's Python work cannot overlap the server's; measured on this 2-core machine at
32 streams, the step took 11 ms alone and 15 to 17 ms per token under the server. Commands and results cross
two one-way pipes as small pickles (token ids, not tensors): one message per step.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from aiinfra.serve.engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from aiinfra.serve.tensor_parallel import TensorParallelConfig, join_group, shard_model

STOP = ("stop",)
logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed during a step, or its process exited; in-flight requests get this error."""


@dataclass
class StepResult:
    """What the event loop learns after one engine step."""

    outputs: list[RequestOutput]
    stats: EngineStats
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(request id, message) of adds the engine refused"""
    failure: str | None = None
    """the step raised (or the engine process died): the requests in `failed_ids` were dropped and get this message"""
    failed_ids: list[str] | None = None
    """the requests the failure dropped; None: every request the server is waiting on (the engine is gone)"""


def run_engine_loop(
    engine: LLMEngine, next_commands: Callable[[bool], list[tuple] | None], deliver: Callable[[StepResult], None]
) -> None:
    """Drain commands, step, deliver; `next_commands(block)` returns None to stop and blocks while idle if asked."""
    while True:
        commands = next_commands(not engine.has_unfinished())
        if commands is None:
            return
        errors: list[tuple[str, str]] = []
        for kind, request_id, *rest in commands:
            if kind == "add":
                try:
                    engine.add_request(request_id, *rest)
                except ValueError as error:
                    errors.append((request_id, str(error)))
            else:
                engine.abort_request(request_id)
        outputs: list[RequestOutput] = []
        failure: str | None = None
        failed_ids: list[str] = []
        if engine.has_unfinished():
            try:
                outputs = engine.step()
            except Exception as error:  # a failed step must not hang every waiting client
                logger.exception("engine step failed")
                failure = f"engine step failed: {error!r}"
                failed_ids = list(engine.scheduler.requests)
                for request_id in failed_ids:
                    engine.abort_request(request_id)
        if outputs or errors or failure or commands:
            deliver(StepResult(outputs, engine.stats(), errors, failure, failed_ids))


class EngineCore(Protocol):
    """What `AsyncEngine` needs from wherever the engine runs."""

    max_seq_len: int
    max_num_seqs: int
    num_blocks: int
    pid: int
    """the process the model runs in"""

    @property
    def is_alive(self) -> bool: ...

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[StepResult], None]) -> None: ...

    def post(self, command: tuple) -> None: ...

    def stop(self) -> None: ...


class ThreadEngineCore:
    """The engine on a background thread of this process (tests, notebooks, an engine built in memory)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.max_seq_len = engine.max_seq_len
        self.max_num_seqs = engine.config.max_num_seqs
        self.num_blocks = engine.num_blocks
        self.pid = os.getpid()
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[StepResult], None]) -> None:
        self._stopping = False

        def deliver_on_loop(result: StepResult) -> None:
            loop.call_soon_threadsafe(deliver, result)

        self._thread = threading.Thread(
            target=run_engine_loop, args=(self.engine, self._next_commands, deliver_on_loop), name="aiinfra-engine",
            daemon=True,
        )
        self._thread.start()

    def post(self, command: tuple) -> None:
        with self._lock:
            self._inbox.append(command)
            self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _next_commands(self, block: bool) -> list[tuple] | None:
        while True:
            with self._lock:
                if self._stopping:
                    return None
                commands, self._inbox = self._inbox, []
                if commands or not block:
                    return commands
                self._wake.clear()
            self._wake.wait()


@dataclass(frozen=True)
class EngineRecipe:
    """How the engine process builds its engine: everything is loaded there, nothing large is pickled."""

    model_path: Path
    engine_config: EngineConfig
    int8: bool = False
    dtype: str = "auto"
    """the weights' dtype: auto (the checkpoint's), bf16, fp16 or fp32"""
    threads: int = 0
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    cpus: tuple[int, ...] = ()
    """pin the engine process to these CPUs (vLLM's VLLM_CPU_OMP_THREADS_BIND): its caches stay its own and the
    HTTP server runs on the others; empty: not pinned"""


def build_engine(recipe: EngineRecipe, rank: int = 0) -> LLMEngine:
    """The engine the recipe describes; under tensor parallelism, `rank`'s shard of it (joining the group first)."""
    import torch

    from aiinfra.serve.loading import load_model
    from aiinfra.serve.quantize import quantize_int8

    if recipe.cpus:
        os.sched_setaffinity(0, recipe.cpus)
    # torch sized its default thread pool from every CPU when it was imported, before the pinning.
    if recipe.threads or recipe.cpus:
        torch.set_num_threads(recipe.threads or len(recipe.cpus))
    group = None
    if recipe.tensor_parallel.size > 1:
        group = join_group(recipe.tensor_parallel, rank)
    served = load_model(recipe.model_path, dtype=recipe.dtype)
    if group is not None:
        shard_model(served.model, group)
    if recipe.int8:
        quantize_int8(served.model)
    return LLMEngine(served.model, recipe.engine_config, served.eos_token_id, tensor_parallel=group)


def _tensor_parallel_worker_main(recipe: EngineRecipe, rank: int) -> None:
    """A rank other than 0: build its shard, then execute every plan rank 0 sends until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server (or the node's command) stops the ranks
    try:
        engine = build_engine(recipe, rank)
    except (ValueError, OSError):  # a user mistake (a model that does not split, a bad folder): rank 0 reports it
        return
    engine.serve_plans()


def start_tensor_parallel_workers(recipe: EngineRecipe, ranks: range) -> list[multiprocessing.process.BaseProcess]:
    """Spawn the given ranks of the recipe's tensor-parallel group on this node (daemons of this process)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_tensor_parallel_worker_main, args=(recipe, rank), name=f"aiinfra-tp{rank}",
                               daemon=True) for rank in ranks]
    for worker in workers:
        worker.start()
    return workers


def run_node_workers(recipe: EngineRecipe) -> int:
    """A node other than 0 (`--node-rank` > 0): run this node's ranks until rank 0 stops them; the worst exit code."""
    workers = start_tensor_parallel_workers(recipe, recipe.tensor_parallel.ranks_of_this_node())
    for worker in workers:
        worker.join()
    return max((abs(worker.exitcode or 0) for worker in workers), default=0)


def _engine_process_main(recipe: EngineRecipe, commands: Connection, results: Connection) -> None:
    """The engine process: build the engine, report ready (or the error), then run the loop until told to stop or
    until the server's end of the pipe closes (the server died)."""
    # Ctrl+C reaches the whole process group: the server shuts down gracefully and stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            engine = build_engine(recipe)
        except (ValueError, OSError) as error:  # a user mistake (bad folder, cache too small): one clear line
            results.send(("error", str(error)))
            return
        except Exception as error:  # a bug: the parent shows the child's traceback
            results.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
            return
        results.send(("ready", engine.max_seq_len, engine.config.max_num_seqs, engine.num_blocks))
    except (BrokenPipeError, EOFError):
        return  # the server died while this process was loading

    def next_commands(block: bool) -> list[tuple] | None:
        received: list[tuple] = []
        try:
            if block:
                commands.poll(None)
            while commands.poll(0):
                command = commands.recv()
                if command == STOP:
                    return None
                received.append(command)
        except (EOFError, OSError):
            return None
        return received

    try:
        run_engine_loop(engine, next_commands, results.send)
    except (BrokenPipeError, EOFError):
        pass  # the server is gone
    finally:
        engine.close()  # the other tensor-parallel ranks stop with this one


class ProcessEngineCore:
    """The engine in a child process (spawned, so no forked torch or thread state), built from an `EngineRecipe`.

    The constructor starts it and waits until the model is loaded, raising the child's error (a bad model folder)
    as a ValueError; `start` attaches the result pipe to the event loop. Commands go out through a sender thread so
    that a burst of large prompts never blocks the event loop on a full pipe. If the child dies, every in-flight
    request fails with EngineDeadError and `is_alive` turns False (the server's /health then answers 503).
    """

    def __init__(self, recipe: EngineRecipe, startup_timeout_s: float = 600.0):
        context = multiprocessing.get_context("spawn")
        # Node 0's other tensor-parallel ranks run beside the engine process (rank 0), which is a daemon and so
        # cannot start processes itself.
        local_ranks = recipe.tensor_parallel.ranks_of_this_node()
        self.workers = start_tensor_parallel_workers(recipe, local_ranks[1:]) if len(local_ranks) > 1 else []
        command_reader, self._command_writer = context.Pipe(duplex=False)
        self._result_reader, result_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_engine_process_main, args=(recipe, command_reader, result_writer), name="aiinfra-engine",
            daemon=True,
        )
        self.process.start()
        command_reader.close()
        result_writer.close()
        try:
            if not self._result_reader.poll(startup_timeout_s):
                raise ValueError(f"the engine process did not load {recipe.model_path} within "
                                 f"{startup_timeout_s:.0f} s")
            try:
                message = self._result_reader.recv()
            except EOFError:
                self.process.join(5)
                raise ValueError(f"the engine process exited with code {self.process.exitcode} while loading "
                                 f"{recipe.model_path}") from None
            if message[0] == "error":
                raise ValueError(message[1])
        except ValueError:
            self._close_pipes()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
            self._stop_workers()
            raise
        _, self.max_seq_len, self.max_num_seqs, self.num_blocks = message
        self.pid = self.process.pid
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="aiinfra-engine-sender", daemon=True)
        self._sender.start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False

    @property
    def is_alive(self) -> bool:
        return not self._dead and self.process.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[StepResult], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        loop.add_reader(self._result_reader.fileno(), self._on_results)

    def post(self, command: tuple) -> None:
        self._outbox.put(command)

    def stop(self) -> None:
        """Ask the child to stop after its step; kill it if it does not exit within 10 s.

        The result pipe is closed first: a child blocked sending a step's results then gets a broken pipe and
        exits instead of never reading the stop command."""
        if self._loop is not None and not self._dead:
            self._loop.remove_reader(self._result_reader.fileno())
        self._dead = True
        self._outbox.put(STOP)
        self._outbox.put(None)
        self._result_reader.close()
        self._sender.join(5)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._close_pipes()
        self._stop_workers()

    def _stop_workers(self) -> None:
        """Join the tensor-parallel ranks (rank 0 told them to stop as it exited); kill any still running."""
        for worker in self.workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(5)

    def _close_pipes(self) -> None:
        self._result_reader.close()
        self._command_writer.close()

    def _send_commands(self) -> None:
        try:
            while (command := self._outbox.get()) is not None:
                self._command_writer.send(command)
        except OSError:
            pass  # the child is gone; the result pipe reports it
        finally:
            self._command_writer.close()

    def _on_results(self) -> None:
        """On the event loop, when the result pipe is readable: deliver every step result waiting in it."""
        try:
            while self._result_reader.poll():
                self._deliver(self._result_reader.recv())
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(self._result_reader.fileno())
            self._dead = True
            self.process.join(1)
            code = self.process.exitcode
            self._deliver(StepResult([], EngineStats(num_blocks=self.num_blocks), failure=(
                f"the engine process exited (code {code}, pid {self.process.pid})")))

