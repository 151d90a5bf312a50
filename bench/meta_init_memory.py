"""Peak memory of FSDP training on 2 processes with meta-device construction, on a model of about 1B parameters.

Workload: a Llama-style model (default dim 2048, 20 layers, 16 heads, SwiGLU 5632, vocabulary 4096: 1.03B
parameters, 4.1 GB in fp32) trained for --steps steps of one 32-token sequence per rank with AdamW, fp32, FSDP
(`parallel.dp_shard=2`) on 2 gloo processes, on the embedded corpus. Each rank records its peak RSS before the
model is built (the baseline: the process, torch and the tokenized corpus), once the trainer is built, and after
training, and the bytes its shards of parameters, gradients and AdamW state really hold.

Baseline, in the same run: what the old construction did before sharding, building the whole model in fp32 and
initialising it on one process (`Transformer(spec)` then `init_weights`), measured as that process's peak RSS
above its own baseline. Under FSDP x 2 the old trainer did this on every rank, so it added a full copy per rank on
top of the sharded training state; the new one allocates each rank's shards only.

    python bench/meta_init_memory.py [--dim 2048] [--layers 20] [--steps 3]

Needs about 2 x 9 GB of free memory at the default size. glibc's mmap and trim thresholds are fixed at 1 MiB in
the workers so that RSS counts live memory (freed heap is handed back). Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def overrides(args: argparse.Namespace, cache_dir: str) -> list[str]:
    return [
        f"data.cache_dir={cache_dir}",
        f"model.dim={args.dim}",
        f"model.n_layers={args.layers}",
        f"model.n_heads={args.heads}",
        f"model.n_kv_heads={args.heads}",
        f"model.ffn_dim={args.ffn}",
        "model.vocab_size=4096",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch=1",
        f"train.steps={args.steps}",
        "train.grad_clip=0",
        "train.eval_every=0",
        "train.dtype=fp32",
        "train.device=cpu",
        "run.progress=false",
        "run.sample_tokens=0",
        "parallel.measure_comm_every=0",
        "parallel.dp_shard=2",
    ]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> None:
    """One rank: build the trainer (meta construction, shards only), train, report peaks and shard bytes."""
    import torch.distributed as dist

    from aiinfra.config import load_config
    from aiinfra.data.dataset import prepare_dataset
    from aiinfra.distributed.memory import state_bytes
    from aiinfra.distributed.runtime import SilentLogger, release_mesh_groups, shutdown_process_groups
    from aiinfra.train import Trainer

    config = load_config(None, spec["overrides"])
    dist.init_process_group("gloo")
    for rank in range(dist.get_world_size()):  # rank 0 fills the caches, then the others read them
        if dist.get_rank() == rank:
            prepare_dataset(config.data.corpus, config.model.vocab_size, config.data.val_fraction,
                            Path(config.data.cache_dir))
        dist.barrier()
    gc.collect()
    figures = {"baseline_peak_rss_bytes": peak_rss_bytes()}
    trainer = Trainer(config, run_dir=Path(spec["out"]) / "run")
    figures["built_peak_rss_bytes"] = peak_rss_bytes()
    losses = [trainer.run_step(SilentLogger())["loss"] for _ in range(spec["steps"])]
    figures["trained_peak_rss_bytes"] = peak_rss_bytes()
    figures |= state_bytes(trainer.runner.root, trainer.optimizer) | {"losses": losses}
    Path(spec["out"], f"memory-{dist.get_rank()}.json").write_text(json.dumps(figures))
    release_mesh_groups(trainer.runtime.mesh)
    trainer.checkpoints.close()
    shutdown_process_groups()


def full_build(spec: dict) -> None:
    """The old construction's cost: the whole model built and initialised in fp32 on one process."""
    from aiinfra.config import load_config
    from aiinfra.models import Transformer

    model_spec = load_config(None, spec["overrides"]).model
    gc.collect()
    baseline = peak_rss_bytes()
    model = Transformer(model_spec)
    model.init_weights(seed=0)
    figures = {"baseline_peak_rss_bytes": baseline, "built_peak_rss_bytes": peak_rss_bytes(),
               "parameters": sum(p.numel() * p.element_size() for p in model.parameters())}
    Path(spec["out"], "full-build.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "aiinfra"))
    args = parser.parse_args()
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        spec = {"overrides": overrides(args, args.cache_dir), "steps": args.steps, "out": out}
        spec_path = Path(out, "spec.json")
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, __file__, "--full-build", str(spec_path)], check=True, env=env)
        full = json.loads(Path(out, "full-build.json").read_text())
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        __file__, "--worker", str(spec_path)], check=True, env=env)
        ranks = [json.loads(Path(out, f"memory-{rank}.json").read_text()) for rank in (0, 1)]
    mib = 1 << 20
    params = full["parameters"] // 4
    old_build = (full["built_peak_rss_bytes"] - full["baseline_peak_rss_bytes"]) / mib
    print(f"model: {params / 1e9:.2f}B parameters, {full['parameters'] / 2**30:.2f} GiB in fp32; FSDP x 2, "
          f"{args.steps} steps, losses {[round(loss, 3) for loss in ranks[0]['losses']]}")
    print(f"old construction (full model built, then sharded): +{old_build:.0f} MiB per rank before sharding")
    result = {"parameters": params, "full_fp32_bytes": full["parameters"], "full_build_peak_mib": round(old_build)}
    for rank, figures in enumerate(ranks):
        # The step ends with zero_grad(set_to_none): the gradient shard (under FSDP2 the parameter shard's size
        # in fp32) was live at the peak but is gone when the shards are counted, so it is counted as that size.
        gradients = figures["gradients"] or figures["parameters"]
        shards = figures["parameters"] + gradients + figures["optimizer"]
        built = (figures["built_peak_rss_bytes"] - figures["baseline_peak_rss_bytes"]) / mib
        trained = (figures["trained_peak_rss_bytes"] - figures["baseline_peak_rss_bytes"]) / mib
        print(f"rank {rank}: built +{built:.0f} MiB (its parameter shard {figures['parameters'] / mib:.0f} MiB), "
              f"trained +{trained:.0f} MiB (shards of params, grads, AdamW {shards / mib:.0f} MiB; over them "
              f"{trained - shards / mib:+.0f} MiB), baseline {figures['baseline_peak_rss_bytes'] / mib:.0f} MiB")
        result[f"rank{rank}_built_peak_mib"] = round(built)
        result[f"rank{rank}_trained_peak_mib"] = round(trained)
        result[f"rank{rank}_shards_mib"] = round(shards / mib)
        result[f"rank{rank}_trained_over_shards_mib"] = round(trained - shards / mib)
    new_build = max(result["rank0_built_peak_mib"], result["rank1_built_peak_mib"])
    result["build_peak_new_over_old"] = round(new_build / old_build, 3)
    print(f"building: +{new_build:.0f} MiB per rank (its shard) against +{old_build:.0f} MiB for the old full copy "
          f"({result['build_peak_new_over_old']:.2f}x); the training peak is the sharded state's either way at "
          f"dp_shard=2, where AdamW's shard (8 bytes per parameter) outweighs a full fp32 copy (4)")
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--full-build"):
        spec = json.loads(Path(sys.argv[2]).read_text())
        (worker if sys.argv[1] == "--worker" else full_build)(spec)
    else:
        main()
