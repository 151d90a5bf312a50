"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, MFU; on one process or many.

One step reads: take this rank's slice of the batch, forward/backward each micro-batch, clip, step the optimizer
and schedule, log, checkpoint when due. Everything that must survive a restart (model, optimizer, schedule, step,
every rank's RNG, each data-parallel rank's data position) goes into the checkpoints under <run>/checkpoints, and a
run directory that holds checkpoints but no finished model resumes from its latest good one. Under torchrun the same
loop runs on every rank: `distributed.runtime` supplies the process group, the parallelized model (or pipeline
schedule), the data-parallel coordinates and the per-rank figures. With `distill.teacher`, a frozen teacher runs on
each micro-batch first and the loss is train/distill.py's (its two terms logged as kd_loss and ce_loss).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aiinfra.checkpoint.manager import CheckpointManager, CheckpointPolicy, Goodput, TrainingState
from aiinfra.checkpoint.run_dir import point_latest, save_run
from aiinfra.config import Config, ConfigError
from aiinfra.data.dataset import TokenDataset, default_cache_dir, prepare_dataset, unigram_entropy_nats
from aiinfra.data.sampler import WindowSampler, eval_batches
from aiinfra.data.tokenizer import decode, encode
from aiinfra.distributed.runtime import SilentLogger, make_runtime
from aiinfra.hf_format import hf_tokenizer
from aiinfra.models import Transformer, sample
from aiinfra.observe.device_peak import device_peak
from aiinfra.observe.plots import plot_loss_curve
from aiinfra.observe.step_log import StepLogger, read_metrics, truncate_metrics
from aiinfra.observe.train_observer import TrainObserver
from aiinfra.train.distill import build_distiller
from aiinfra.train.faults import FaultSchedule, check_fault_rank, maybe_slow


@dataclass
class TrainResult:
    """Headline figures of a finished run."""

    run_dir: str
    steps: int
    final_train_loss: float
    final_val_loss: float
    unigram_entropy_nats: float
    tokens_per_s: float
    mfu: float
    peak_flops_source: str
    wall_time_s: float
    sample: str


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear from 1/warmup to 1, then cosine down to `min_lr_ratio` at the end."""
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), none on norm scales and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    cfg = config.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=next(model.parameters()).device.type == "cuda",
    )


def _loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class RunCounters:
    """Run-level counters that the checkpoints carry across restarts."""

    def __init__(self) -> None:
        self.restarts = 0

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restarts = int(state["restarts"])


def default_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model.preset or 'custom'}-{stamp}"


class Trainer:
    """Owns the model, optimizer, schedule and data of one run (of this rank's share of it, under torchrun)."""

    def __init__(self, config: Config, run_dir: Path | None = None):
        self.config = config
        cfg = config.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(cfg.deterministic)
        self.runtime = make_runtime(config, resolve_device(cfg.device))
        self.device = self.runtime.device

        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
        marker = self._check_shared_cache(cache_dir)
        self.dataset = self._prepare_data(cache_dir)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
        with self.runtime.main_first():  # rank 0 fills the peak-FLOP/s cache; the others read it
            self.peak = device_peak(self.device, self.autocast_dtype or torch.float32, cache_dir)
        if marker is not None and self.runtime.is_main:  # every rank checked it before that barrier
            marker.unlink(missing_ok=True)
        tokenizer_vocab = self.dataset.tokenizer.get_vocab_size()
        if tokenizer_vocab > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} < the tokenizer's {tokenizer_vocab}")

        # Built on the meta device (no memory), parallelized there, then each rank allocates and initialises only
        # its shards from train.seed: the same full model whatever the layout (distributed/materialize.py).
        # A full replica of the teacher on every rank, outside DDP/FSDP (train/distill.py); None without one.
        self.distiller = build_distiller(config, self.dataset.tokenizer, self.device)
        loss_from_logits = self.distiller.loss_from_logits if self.distiller is not None else _loss_from_logits
        seed_everything(cfg.seed)
        with torch.device("meta"):
            model = Transformer(config.model)
        self.runner = self.runtime.build_runner(model, self._autocast, loss_from_logits)
        # What this rank trains: the model (sharded in place under FSDP/TP), or its pipeline stages.
        self.model = self.runner.model
        self.optimizer = build_optimizer(self.runner.root, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        # train.micro_batch is per data-parallel rank: the global batch grows with the data-parallel degree.
        dp_rank, dp_size = self.runtime.dp_rank, self.runtime.dp_size
        global_batch = cfg.micro_batch * cfg.grad_accum * dp_size
        self.sampler = WindowSampler(self.dataset.train, cfg.seq_len, global_batch, cfg.seed, dp_rank, dp_size)
        self.step = 0

        self.flops_per_token = config.model.train_flops_per_token(cfg.seq_len)
        self.tokens_per_step = global_batch * cfg.seq_len
        self.peak_flops_per_s = self.peak.flops_per_s * self.runtime.world_size

        self.run_dir = Path(self.runtime.share(str(run_dir or config.run.dir or default_run_dir(config))))
        if (self.run_dir / "model.safetensors").exists():
            raise ConfigError(f"run.dir={str(self.run_dir)!r} already holds a finished run; choose another")
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        check_fault_rank(config.fault, self.runtime.world_size)

        ckpt = config.checkpoint
        checkpoint_dir = Path(ckpt.dir.format(rank=self.runtime.rank)) if ckpt.dir else self.run_dir / "checkpoints"
        self.checkpoints = CheckpointManager(
            checkpoint_dir,
            CheckpointPolicy(ckpt.every_steps, ckpt.every_seconds, ckpt.keep_last, ckpt.async_save,
                             overlap_staging=ckpt.async_save),
            dp_rank=dp_rank,
            dp_size=dp_size,
            timeout_s=config.parallel.collective_timeout_s,
            storage=ckpt.storage,
        )
        self.observer = TrainObserver(config, self.run_dir, self.runtime.rank, self.runtime.world_size, self.device,
                                      self.tokens_per_step)
        self.goodput = Goodput()
        self.counters = RunCounters()
        self.training_state = TrainingState(
            self.model,  # under pipeline parallelism, a ModuleList of this rank's stages
            self.optimizer,
            self.scheduler,
            data=self.sampler,
            extra={"goodput": self.goodput, "counters": self.counters},
        )

    def _check_shared_cache(self, cache_dir: Path) -> Path | None:
        """Ranks meet in `cache_dir` while they prepare the data, waiting for each other's files with no deadline, so
        a folder that is not the same on every rank (a node-local home on a cluster) is refused first rather than
        left to hang. Returns the marker file rank 0 wrote (None on one process); rank 0 deletes it once every rank
        is past a later barrier."""
        if self.runtime.world_size == 1:
            return None
        marker = cache_dir / f".shared-{self.runtime.share(uuid.uuid4().hex if self.runtime.is_main else None)}"
        with self.runtime.main_first():
            if self.runtime.is_main:
                cache_dir.mkdir(parents=True, exist_ok=True)
                marker.touch()
            elif not marker.exists():
                raise ConfigError(f"data.cache_dir={str(cache_dir)!r} is not the folder rank 0 sees (rank "
                                  f"{self.runtime.rank}): set data.cache_dir to a folder every rank shares")
        return marker

    def _prepare_data(self, cache_dir: Path) -> TokenDataset:
        """Every rank tokenizes a share of the corpus (data/dataset.py)."""
        data = self.config.data
        tokenizer_file, end_of_text_id = hf_tokenizer(self.config.train.init_from)
        try:
            return prepare_dataset(data.corpus, self.config.model.vocab_size, data.val_fraction, cache_dir,
                                   rank=self.runtime.rank, world_size=self.runtime.world_size,
                                   tokenizer_file=tokenizer_file, end_of_text_id=end_of_text_id)
        except (ValueError, FileNotFoundError) as error:  # CorpusError included: the corpus is the bad input
            raise ConfigError(f"data.corpus={data.corpus!r}: {error}") from None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or self.config.parallel.mixed_precision == "fsdp":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's metrics (loss averaged over ranks)."""
        cfg = self.config.train
        inputs, targets = self.sampler.next_batch()
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        losses = []
        for index, (micro_inputs, micro_targets) in enumerate(
            zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum))
        ):
            if self.distiller is not None:
                self.distiller.teach(micro_inputs)
            with self.runner.grad_sync(index == cfg.grad_accum - 1):
                losses.append(self.runner.forward_backward(micro_inputs, micro_targets, 1 / cfg.grad_accum))
        grad_norm = self.runner.clip_grad_norm(cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        self.checkpoints.before_update()  # an async save's copy of the weights ran during forward and backward
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        local_loss = None if losses[0] is None else torch.stack(losses).sum()
        metrics = {"loss": self.runtime.mean_loss(local_loss), "grad_norm": float(grad_norm), "lr": lr}
        if self.distiller is not None:
            kd, ce = self.distiller.take_terms()
            metrics |= {"kd_loss": self.runtime.mean_loss(kd), "ce_loss": self.runtime.mean_loss(ce)}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows: the same windows, and the same figure, for every layout."""
        cfg = self.config.train
        dp_rank, dp_size = self.runtime.dp_rank, self.runtime.dp_size
        self.runner.module.eval()
        losses = []
        # Batches of the global batch size, split over data-parallel ranks and micro-batches as in training, so
        # every layout sees the same windows; a short last batch is evaluated whole on every rank instead.
        global_batch = cfg.micro_batch * cfg.grad_accum * dp_size
        for inputs, targets in eval_batches(self.dataset.val, cfg.seq_len, global_batch, cfg.eval_batches):
            if len(inputs) == global_batch:
                inputs, targets = inputs.chunk(dp_size)[dp_rank], targets.chunk(dp_size)[dp_rank]
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            micro = [
                self.runner.loss(i, t) for i, t in zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum))
            ]
            losses.append(self.runtime.mean_loss(None if micro[0] is None else torch.stack(micro).mean()))
        self.runner.module.train()
        return sum(losses) / len(losses)

    def sample_text(self, model: Transformer, prompt: str, max_new_tokens: int) -> str:
        """`prompt` continued by `model` (the full model: on one process, or the main rank's export)."""
        tokenizer = self.dataset.tokenizer
        with self._autocast():
            ids = sample(
                model.eval(),
                encode(tokenizer, prompt),
                max_new_tokens,
                temperature=0.7,
                top_k=40,
                seed=self.config.train.seed,
                stop_id=tokenizer.token_to_id("<|endoftext|>"),
            )
        model.train()
        return prompt + decode(tokenizer, ids)

    def run_step(self, logger: StepLogger) -> dict[str, Any]:
        """One training step as `fit` runs it: train, time, evaluate when due, log. Returns the step's record."""
        cfg = self.config.train
        busy_clock = self.observer.busy_clock
        with self.runtime.measure_step(self.step + 1) as measured:
            step_start, busy_start = time.perf_counter(), busy_clock()
            maybe_slow(self.config.fault, self.step + 1, self.runtime.rank)
            metrics = self.train_step()
            compute_s = busy_clock() - busy_start
            step_time_s = time.perf_counter() - step_start
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {self.step}; lower train.lr")
        tokens_per_s = self.tokens_per_step / step_time_s
        record = {
            "step": self.step,
            **metrics,
            "step_time_s": step_time_s,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops_per_s,
            "tokens": self.step * self.tokens_per_step,
            **self.runtime.step_record(step_time_s, measured, compute_s, self.observer.power.read()),
        }
        straggler_line = self.observer.enrich(record)
        if straggler_line:
            logger.print(straggler_line)
        self.goodput.add_step(step_time_s)
        self.checkpoints.maybe_save(self.step, self.training_state)
        record |= {
            **self.checkpoints.metrics.as_dict(),
            "restarts": self.counters.restarts,
            "effective_training_time_ratio": self.goodput.ratio(),
        }
        if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
            record["val_loss"] = self.evaluate()
            logger.print(
                f"step {self.step}: train loss {metrics['loss']:.3f}, validation loss {record['val_loss']:.3f}"
            )
        logger.log(record)
        self.observer.publish(record)
        return record

    def resume(self) -> int:
        """Load the latest good checkpoint of this run directory, if any (all ranks); return the step it holds.

        The metrics of steps past that step (trained before a crash, lost with it) are dropped from metrics.jsonl,
        so the file reads as one uninterrupted run.
        """
        step = self.checkpoints.load_latest(self.training_state)
        if step is not None:
            self.step = step
            self.counters.restarts += 1
        if self.runtime.is_main:
            kept = truncate_metrics(self.run_dir, self.step)
            if step is not None:
                print(
                    f"resumed {self.run_dir} at step {step} from its latest checkpoint "
                    f"(restart {self.counters.restarts}; {kept} metrics lines kept)",
                    file=sys.stderr,
                    flush=True,
                )
        return self.step

    def fit(self) -> TrainResult:
        """Train (or resume) to `train.steps` steps, checkpointing as configured; write the run directory."""
        cfg, run = self.config.train, self.config.run
        started = time.perf_counter()
        self.resume()
        # Only the main rank writes metrics and prints; the others train silently beside it.
        logger = (
            StepLogger(self.run_dir, cfg.steps, progress=run.progress, log_every=run.log_every)
            if self.runtime.is_main
            else SilentLogger()
        )
        logger.print(
            f"run {self.run_dir}: {self.config.model.num_params() / 1e6:.2f}M parameters, "
            f"{self.tokens_per_step} tokens/step, {self.runtime.describe()}, {self.device} {cfg.dtype}, "
            f"{torch.get_num_threads()} threads each; MFU peak {self.peak.flops_per_s / 1e12:.3f} TFLOP/s per process "
            f"({self.peak.source})"
        )
        records = read_metrics(self.run_dir) if self.runtime.is_main and self.step else []
        faults = FaultSchedule(self.config.fault, self.runtime.world_size, self.step, cfg.steps)
        try:
            logger.print(self.observer.start(self.step, self.counters.restarts, self.peak.flops_per_s))
            self.runner.module.train()
            while self.step < cfg.steps:
                records.append(self.run_step(logger))
                faults.maybe_kill(self.step, self.runtime.rank, before_kill=self.checkpoints.wait)
            # The final state, for continuing or resharding later (free when the policy just saved this step).
            self.checkpoints.save(self.step, self.training_state, block=True)
        finally:
            logger.close()
            self.observer.close()
            self.checkpoints.close()

        # The first step pays one-off warm-up costs (allocations, kernel selection): leave it out of the rate.
        timed = records[1:] or records
        timed_s = sum(r["step_time_s"] for r in timed)
        tokens_per_s = len(timed) * self.tokens_per_step / timed_s if timed_s else 0.0
        # Only the main rank keeps the records of steps trained before a resume.
        train_loss = records[-1]["loss"] if records else math.nan
        val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), math.nan)
        entropy = unigram_entropy_nats(self.dataset.train, self.dataset.tokenizer.get_vocab_size())
        full_model = self.runtime.export_model(self.runner)  # a collective: every rank takes part
        text = ""
        if full_model is not None and run.sample_tokens:
            text = self.sample_text(full_model, run.sample_prompt, run.sample_tokens)
        result = TrainResult(
            run_dir=str(self.run_dir),
            steps=self.step,
            final_train_loss=train_loss,
            final_val_loss=val_loss,
            unigram_entropy_nats=entropy,
            tokens_per_s=tokens_per_s,
            mfu=tokens_per_s * self.flops_per_token / self.peak_flops_per_s,
            peak_flops_source=self.peak.source,
            wall_time_s=time.perf_counter() - started,
            sample=text,
        )
        if full_model is not None:
            save_run(self.run_dir, full_model, self.config, self.dataset.tokenizer, asdict(result))
            plot_loss_curve(read_metrics(self.run_dir), self.run_dir / "loss_curve.png", reference_nats=entropy)
            point_latest(self.run_dir)
        return result


def train(config: Config) -> TrainResult | None:
    """Train one model as `config` says; the entry point of `aiinfra train` (and of each torchrun worker).

    Returns the result on the main rank, None on the other workers (the main rank reports).
    """
    trainer = Trainer(config)
    runtime = trainer.runtime
    try:
        result = trainer.fit()
    finally:
        del trainer  # its model, optimizer and checkpoint manager hold process groups that close() frees
        runtime.close()
    return result if runtime.is_main else None
