"""The training configuration: a tree of validated sections, loaded from TOML, overridden by `--set key=value`.

Every field has a one-line description. Unknown keys and bad values are rejected with a `ConfigError` whose
message names the key, where it came from (the file or `--set`) and what was expected.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aiinfra.spec import ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration the user wrote is wrong; the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """The text trained on, its validation split and where its tokenized form is cached."""

    corpus: str = Field(
        "stdlib",
        description="'stdlib' (this interpreter's standard library), a text, JSONL ('text' field) or Parquet ('text' "
        "column) file, or a folder of them",
    )
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents held out for validation")
    cache_dir: str | None = Field(None, description="where tokenized corpora are cached (default ~/.cache/aiinfra)")


class TrainConfig(Section):
    """The optimization loop: steps, batch, learning-rate schedule, AdamW, evaluation, dtype and device."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    micro_batch: int = Field(16, ge=1, description="sequences per forward/backward pass on one process")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    warmup_steps: int = Field(30, ge=0, description="linear warmup steps before the cosine decay (capped at steps)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 disables)")
    eval_every: int = Field(100, ge=0, description="evaluate on the validation split every N steps (0: only at end)")
    eval_batches: int = Field(8, ge=1, description="validation batches per evaluation")
    seed: int = Field(1234, description="seed of weights, data order and dropout-free sampling")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="autocast compute dtype; weights stay fp32")
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu' or 'cuda[:N]'")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores)")
    compile: bool = Field(False, description="torch.compile the model")
    deterministic: bool = Field(False, description="use deterministic algorithms (for bitwise-reproducible runs)")
    init_from: str | None = Field(
        None,
        description="fine-tune from a Hugging Face Llama-format folder: its config.json sets the model (model.* "
        "must agree), its tokenizer.json tokenizes the corpus, its safetensors are the starting weights (each rank "
        "reads only its own shards)",
    )


def stages_per_rank(schedule: str) -> int:
    """Virtual pipeline stages each rank holds under `schedule`."""
    return 2 if schedule == "interleaved_1f1b" else 1


class ParallelConfig(Section):
    """How the model is spread over processes (world size = dp_replicate * dp_shard * tp * pp)."""

    dp_replicate: int = Field(
        1, ge=1, description="data-parallel replicas that all-reduce gradients (DDP; HSDP with dp_shard)"
    )
    dp_shard: int = Field(1, ge=1, description="data-parallel ranks that shard parameters, grads, optimizer (FSDP2)")
    tp: int = Field(1, ge=1, description="tensor-parallel ranks (Megatron column/row split with sequence parallel)")
    pp: int = Field(1, ge=1, description="pipeline stages' ranks (torch.distributed.pipelining)")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        "1f1b", description="pipeline schedule; interleaved_1f1b holds 2 stages per rank"
    )
    microbatches: int = Field(0, ge=0, description="pipeline micro-batches per step (0: 2 x pp)")
    activation_checkpoint: Literal["none", "selective", "full"] = Field(
        "none", description="recompute activations in backward: none, selective (keep matmul outputs) or full blocks"
    )
    reshard_after_forward: bool = Field(
        True, description="FSDP frees gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2-like)"
    )
    mixed_precision: Literal["autocast", "fsdp"] = Field(
        "autocast",
        description="how train.dtype=bf16 applies: autocast (fp32 params) or FSDP policy (bf16 params, fp32 reduce)",
    )
    cpu_offload: bool = Field(
        False, description="keep FSDP-sharded parameters, grads and optimizer state in CPU memory"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="process-group backend (auto: nccl on CUDA)")
    straggler_ratio: float = Field(1.25, gt=1, description="flag a rank whose step time exceeds this x the median")
    measure_comm_every: int = Field(
        10, ge=0, description="profile one step in N to measure communication time per rank (0: never)"
    )
    collective_timeout_s: float = Field(
        600.0, gt=0, description="a collective that waits longer fails the worker (a hung rank becomes a restart)"
    )

    @property
    def world_size(self) -> int:
        """Processes this layout needs."""
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each takes its own slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def pp_microbatches(self) -> int:
        """Micro-batches per pipeline step."""
        return self.microbatches or 2 * self.pp


class CheckpointConfig(Section):
    """When training saves sharded checkpoints under <run.dir>/checkpoints (and resumes from the latest)."""

    every_steps: int = Field(100, ge=0, description="save every N optimizer steps (0: not by step count)")
    every_seconds: float = Field(0.0, ge=0, description="save when this long has passed since the last save (0: never)")
    keep_last: int = Field(2, ge=0, description="complete checkpoints kept on disk (0: keep all)")
    async_save: bool = Field(True, description="write in the background; only the copy to CPU memory blocks training")
    storage: Literal["shared", "local"] = Field(
        "shared",
        description="'shared': every rank sees every file (reshardable); 'local': node-local disks, each rank saves, "
        "verifies and loads its own files (same layout to resume)",
    )
    dir: str | None = Field(
        None, description="checkpoint directory (default <run.dir>/checkpoints); '{rank}' becomes the global rank"
    )


class FaultConfig(Section):
    """Fault injection for tests and demos: SIGKILL one rank at one step on the job's first attempt, and/or a random
    rank at a random step on each of the first `random_kills` attempts (torchrun's restart count numbers them)."""

    kill_step: int = Field(0, ge=0, description="SIGKILL the rank after this step is logged and saved (0: never)")
    kill_rank: int = Field(0, ge=0, description="the global rank killed at fault.kill_step")
    random_kills: int = Field(
        0, ge=0, description="kill a random rank at a random step on each of the job's first N attempts (0: never)"
    )
    random_seed: int = Field(0, description="seed of the random schedule (the same schedule for the same seed)")
    slow_rank: int = Field(0, ge=0, description="the global rank slowed by fault.slow_ms")
    slow_ms: float = Field(
        0.0, ge=0, description="make fault.slow_rank compute this many ms longer every step (busy CPU time; 0: never)"
    )
    slow_from_step: int = Field(1, ge=1, description="the first step fault.slow_rank is slowed at")


class ObserveConfig(Section):
    """What training exposes while it runs: rank 0's Prometheus /metrics, straggler detection, power, TensorBoard."""

    metrics_port: int = Field(
        0, ge=-1, le=65535,
        description="rank 0 serves Prometheus /metrics on this port (0: a free port, written to "
        "<run.dir>/observe.json; -1: off)",
    )
    metrics_host: str = Field("127.0.0.1", description="address /metrics listens on (0.0.0.0 to be scraped remotely)")
    straggler_threshold: float = Field(
        0.7, gt=0, lt=1,
        description="a rank whose straggler score (fastest compute time / its own) is below this is slow",
    )
    straggler_steps: int = Field(3, ge=1, description="steps in a row a rank must be slow to be named the straggler")
    straggler_min_s: float = Field(
        0.5, ge=0,
        description="seconds of its own compute a rank's slow steps must add up to before it is named (a transient "
        "of the host spans several short steps)",
    )
    tensorboard: bool = Field(False, description="also write TensorBoard event files under <run.dir>/tensorboard")


class DistillConfig(Section):
    """Knowledge distillation from a finished run (the teacher) into the model trained here (the student)."""

    teacher: str | None = Field(
        None,
        description="run directory of the teacher (its model.safetensors, config.toml, tokenizer.json); "
        "none: plain training",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the distillation term; 1 - alpha weighs the cross-entropy (torchtune's kd_ratio)",
    )
    # 1.0 as torchtune's KD recipe: forward KL on the teacher's own distribution. A higher T softens both sides and
    # weighs the teacher's ranking of unlikely tokens more; T^2 keeps the soft term's gradient scale the same.
    temperature: float = Field(
        1.0, gt=0, description="softmax temperature of teacher and student in the distillation term (scaled by T^2)"
    )


class RunConfig(Section):
    """The run directory and what the run prints while it trains and at the end."""

    dir: str | None = Field(None, description="run directory (default runs/<preset>-<timestamp>)")
    log_every: int = Field(10, ge=1, description="print a progress line every N steps when not on a terminal")
    progress: bool = Field(True, description="show the live progress bar")
    sample_tokens: int = Field(120, ge=0, description="tokens of the sample printed at the end (0: none)")
    sample_prompt: str = Field("def ", description="prompt of the sample printed at the end")


class Config(Section):
    """The whole training configuration."""

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="tiny"),
                             description="the model's shape: a named preset (default tiny) and any field overridden")
    data: DataConfig = Field(default_factory=DataConfig, description="the corpus and its validation split")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the optimization loop")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="the parallel layout")
    run: RunConfig = Field(default_factory=RunConfig, description="the run directory and what is printed")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints and resume")
    fault: FaultConfig = Field(default_factory=FaultConfig, description="fault injection for tests and demos")
    distill: DistillConfig = Field(default_factory=DistillConfig,
                                   description="knowledge distillation from a teacher run (off by default)")
    observe: ObserveConfig = Field(default_factory=ObserveConfig,
                                   description="what training exposes while it runs (/metrics, stragglers)")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.fault.kill_step > self.train.steps:
            raise ValueError(f"fault.kill_step={self.fault.kill_step} is past train.steps={self.train.steps}")
        if self.distill.teacher is not None and self.parallel.pp > 1:
            raise ValueError(
                f"distill.teacher with parallel.pp={self.parallel.pp}: distillation needs the full logits on one "
                "rank; use data parallelism (dp_replicate, dp_shard) or tensor parallelism"
            )
        self._check_parallel()
        self._check_checkpoint()
        return self

    def _check_checkpoint(self) -> None:
        ckpt = self.checkpoint
        if ckpt.dir is None:
            return
        try:
            ckpt.dir.format(rank=0)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"checkpoint.dir={ckpt.dir!r}: the only placeholder allowed is {{rank}}") from None
        if "{rank}" in ckpt.dir and ckpt.storage == "shared":
            raise ValueError(
                f"checkpoint.dir={ckpt.dir!r} gives each rank a directory of its own: set checkpoint.storage=\"local\""
            )

    def _check_parallel(self) -> None:
        par, model, train = self.parallel, self.model, self.train
        if par.tp > 1:
            for key, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads)):
                if value % par.tp:
                    raise ValueError(f"parallel.tp={par.tp} must divide model.{key}={value}")
            if train.seq_len % par.tp:
                raise ValueError(f"parallel.tp={par.tp} must divide train.seq_len={train.seq_len} (sequence parallel)")
            if model.position == "learned" or model.is_moe:
                raise ValueError(f"parallel.tp={par.tp}: tensor parallel supports dense rope models only")
            if par.dp_replicate > 1 and par.dp_shard == 1 and par.mixed_precision != "fsdp":
                # DDP over DTensor parameters is not supported by torch (torchtitan refuses it too); FSDP's
                # replicate-and-shard mesh is the way to add replicas to a tensor-parallel model.
                raise ValueError(
                    f"parallel.dp_replicate={par.dp_replicate} with parallel.tp={par.tp}: DDP over a tensor-parallel "
                    "model is not supported; use parallel.dp_shard (FSDP x TP) or dp_replicate with dp_shard > 1 "
                    "(HSDP x TP)"
                )
            if train.compile:
                # torch 2.13 CPU: the compiled block's backward hands DTensor redistribution a plain tensor.
                raise ValueError(f"parallel.tp={par.tp} with train.compile=true is not supported yet")
        if par.pp > 1:
            stages = par.pp * stages_per_rank(par.pp_schedule)
            if model.n_layers < stages:
                raise ValueError(
                    f"parallel.pp={par.pp} with {par.pp_schedule} needs {stages} stages: model.n_layers="
                    f"{model.n_layers} is too few"
                )
            if model.tie_embeddings:
                raise ValueError(f"parallel.pp={par.pp}: set model.tie_embeddings=false (first and last stage differ)")
            local_batch = train.micro_batch
            if local_batch % par.pp_microbatches:
                raise ValueError(
                    f"parallel.microbatches={par.pp_microbatches} must divide train.micro_batch={local_batch}"
                )
        if par.cpu_offload and par.dp_shard == 1:
            raise ValueError("parallel.cpu_offload=true needs parallel.dp_shard > 1 (it offloads FSDP shards)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON, with None values left out (TOML has no null)."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001). The value is read as TOML, else taken as a plain string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _merge(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path)} is not inside a section")
        node = child
    node[path[-1]] = value


def _describe(error: dict[str, Any], origins: dict[str, str], default_origin: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    # A section-level error (say, model: unknown preset) is blamed on the --set that touched that section.
    related = [origin for name, origin in origins.items() if key and name.startswith(key + ".")]
    origin = origins.get(key) or (related[-1] if related else default_origin)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{origin}: {key}: {message}" if key else f"{origin}: {message}"


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's tree; a `ConfigError` naming the file (`what` says which kind) if it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {error}") from None


def _model_from_hf_folder(folder: str, given: Any) -> dict[str, Any]:
    """The model section of a fine-tuning run: the shape in the folder's config.json; model.* fields given as well
    must agree with it (a resolved config.toml repeats them)."""
    from aiinfra.hf_format import read_hf_config, rope_scaling_of, spec_from_hf_config

    source = f"train.init_from={folder!r}"
    hf_config = read_hf_config(Path(folder))
    if rope_scaling_of(hf_config, source) is not None:
        raise ConfigError(f"{source}: its rope_scaling is not supported in training yet (serving supports it)")
    spec = spec_from_hf_config(hf_config, source).model_dump()
    given = given if isinstance(given, dict) else {}
    differing = [f"model.{key}={value!r} (the folder has {spec[key]!r})" for key, value in given.items()
                 if key != "preset" and key in spec and value != spec[key]]
    if differing or given.get("preset") not in (None, spec["preset"]):
        raise ConfigError(f"{source} sets the model from its config.json; these disagree: "
                          f"{', '.join(differing) or 'model.preset=' + repr(given.get('preset'))}")
    return spec


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or the defaults), apply `section.key=value` overrides, validate everything."""
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        tree = read_toml(path, "config file")
    for item in overrides:
        keys, value = parse_override(item)
        _merge(tree, keys, value, f"--set {item}")
        origins[".".join(keys)] = f"--set {item}"
    init_from = (tree.get("train") or {}).get("init_from") if isinstance(tree.get("train"), dict) else None
    if isinstance(init_from, str) and init_from:
        tree["model"] = _model_from_hf_folder(init_from, tree.get("model"))
    elif isinstance(tree.get("model"), dict) and "preset" not in tree["model"]:
        tree["model"]["preset"] = "tiny"  # fields given without a preset override the default preset
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        default_origin = str(path) if path is not None else "config"
        raise ConfigError("; ".join(_describe(e, origins, default_origin) for e in error.errors())) from None
