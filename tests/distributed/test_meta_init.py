"""Meta-device construction: the model is built on `meta`, parallelized there, and each rank allocates and
initialises only its shards (distributed/materialize.py).

Init equivalence: the full model gathered from one process, DDP, FSDP x 2, TP x 2 and a pipeline of 2 is bitwise
the same for one seed. Memory: under FSDP on 2 processes a 134M-parameter model (537 MB in fp32) is built and
trains 3 steps while each rank's peak RSS stays within its shards of parameters, gradients and AdamW state plus
the process's baseline and a stated slack; and building it costs each rank only its half of the parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aiinfra.config import load_config
from aiinfra.models import Transformer
from aiinfra.train import Trainer

UNTIED = "model.tie_embeddings=false"
INIT_LAYOUTS = {
    "ddp": ["parallel.dp_replicate=2", "train.micro_batch=4"],
    "fsdp": ["parallel.dp_shard=2", "train.micro_batch=4"],
    "fsdp_cpu_offload": ["parallel.dp_shard=2", "parallel.cpu_offload=true", "train.micro_batch=4"],
    "tp": ["parallel.tp=2", "train.micro_batch=8"],
    "pp": ["parallel.pp=2", "parallel.microbatches=2", "train.micro_batch=8", UNTIED],
}
# dim 1024, 8 layers, SwiGLU 4096: 134.7M parameters, 539 MB in fp32; seq 32, one sequence per rank per step.
MEMORY_MODEL = [
    "model.dim=1024",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=8",
    "model.ffn_dim=4096",
    "train.micro_batch=1",
    "train.grad_clip=0",
    "parallel.measure_comm_every=0",
    "parallel.dp_shard=2",
]
MEMORY_STEPS = 3
# Building may add to this rank's parameter shards only transients of one parameter at a time (the largest is 16 MB)
# and the rotary tables: far below the 269 MB of the other rank's half that a full copy would add.
BUILD_SLACK_BYTES = 96 << 20
# Training may add, beyond the shards: FSDP's gathered fp32 parameters and unsharded gradients of the block at work
# and of the prefetched next one (4 x 67 MB), and activations (a few MB at seq 32).
TRAIN_SLACK_BYTES = 320 << 20
# glibc keeps freed heap memory (blocks under its dynamic mmap threshold, up to 32 MB) resident: a fixed 1 MiB
# threshold hands it back, so that RSS counts live memory (without it, +640 MiB over the shards, before and after).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def test_meta_init_builds_the_same_full_model_for_one_seed_whatever_the_layout(
    base: list[str], run_worker, tmp_path: Path
) -> None:
    run_worker(2, {"base": base, "layouts": INIT_LAYOUTS, "steps": 0, "out": str(tmp_path)}, tmp_path)
    for tied in (True, False):
        expected = Trainer(load_config(None, base + ([] if tied else [UNTIED])), run_dir=tmp_path / f"one{tied}")
        reference = expected.model.state_dict()
        for name, overrides in INIT_LAYOUTS.items():
            if (UNTIED not in overrides) != tied:
                continue
            state = torch.load(tmp_path / f"{name}.pt", weights_only=False)["state"]
            assert state.keys() == reference.keys(), name
            assert all(torch.equal(state[key], reference[key]) for key in reference), name


def test_meta_init_weights_depend_on_the_seed_only() -> None:
    spec = load_config(None, []).model
    first, second, other = Transformer(spec), Transformer(spec), Transformer(spec)
    first.init_weights(seed=5)
    second.init_weights(seed=5)
    other.init_weights(seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.tok_embeddings.weight, other.tok_embeddings.weight)
    assert first.output.weight is first.tok_embeddings.weight


def test_meta_init_fsdp_rank_peak_memory_stays_within_its_shards(
    base: list[str], run_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in MALLOC_ENV.items():
        monkeypatch.setenv(name, value)  # the workers inherit it
    overrides = base + MEMORY_MODEL
    run_worker(2, {"memory": overrides, "steps": MEMORY_STEPS, "out": str(tmp_path)}, tmp_path)
    spec = load_config(None, overrides).model
    full_param_bytes = 4 * spec.num_params()
    assert full_param_bytes / 2 > BUILD_SLACK_BYTES  # a full copy on a rank would not fit in the slack
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"memory-{rank}.json").read_text())
        shards = figures["parameters"] + figures["gradients"] + figures["optimizer"]
        assert shards <= 4 * full_param_bytes / 2 * 1.01  # params, grads and AdamW's two moments, halved
        baseline = figures["baseline_peak_rss_bytes"]
        built = figures["built_peak_rss_bytes"] - baseline
        trained = figures["trained_peak_rss_bytes"] - baseline
        print(f"rank {rank}: built +{built / 2**20:.0f} MiB, trained +{trained / 2**20:.0f} MiB, shards "
              f"{shards / 2**20:.0f} MiB, full fp32 parameters {full_param_bytes / 2**20:.0f} MiB")
        # Building allocates this rank's half of the parameters, never the whole model.
        assert built <= figures["parameters"] + BUILD_SLACK_BYTES, figures
        assert trained <= shards + TRAIN_SLACK_BYTES, figures
